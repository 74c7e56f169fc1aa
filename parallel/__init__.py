"""Sequence-parallel groups: N processes share every DiT forward of one generation.

- `parallel.group`     form the torch.distributed group (gloo on CPU, nccl on CUDA), its SP / CFG / ulysses /
                       ring sub-groups, bounded joining and naming of dead ranks.
- `parallel.attention` the SP `TokenLayout`: token sharding with masked padding, Ulysses x ring attention.
- `parallel.runner`    inputs once (rank 0 encodes, broadcasts), every rank denoises, outputs once (rank 0
                       decodes); CFG parallel.
- `parallel.fsdp`      optional FSDP2 sharding of the DiT weights over the SP group.
- `parallel.workers`   the group as Ray actors (`SPWorkerGroup`), what a Serve replica owns.
- `parallel.launch`    the group as local spawned processes with a hard deadline (tests, benchmarks).
- `parallel.generate`  `torchrun -m parallel.generate ...`: model.generate's CLI over a torchrun group.

Submodules are imported on use: `parallel.workers` imports Ray, the others only torch.
"""
