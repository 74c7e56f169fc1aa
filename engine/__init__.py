"""The execution layer: one generation or CausVid session run by a group of ranks.

- `engine.protocol`      rank 0's share of a collective call: result-or-error, cancel, progress.
- `engine.runner`        bidirectional T2V / I2V on one rank (rank 0 encodes and decodes, all denoise).
- `engine.causal_runner` CausVid on one rank: the session table and the calls on it.
- `engine.rank`          one rank's pipeline and runner, picked from the model-class registry.
- `engine.tiers`         where a session's caches are: active (compute device) or idle (CPU memory).
- `engine.worker`        one rank as a Ray actor; `engine.worker_group` the group a Serve replica owns.
- `engine.launch`        the group as local spawned processes with a hard deadline (tests, benchmarks).
- `engine.generate`      `torchrun -m engine.generate ...`: model.generate's CLI over a torchrun group.
"""
