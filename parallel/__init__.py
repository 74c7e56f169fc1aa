"""Sequence-parallel groups: N processes share every DiT forward of one generation.

- `parallel.group`     form the torch.distributed group (gloo on CPU, nccl on CUDA), its SP / CFG / ulysses /
                       ring sub-groups, bounded joining and naming of dead ranks.
- `parallel.attention` the SP `TokenLayout`: token sharding with masked padding, Ulysses x ring attention.
- `parallel.runner`    inputs once (rank 0 encodes, broadcasts), every rank denoises, outputs once (rank 0
                       decodes); CFG parallel.
- `parallel.fsdp`      optional FSDP2 sharding of the DiT weights over the SP group.
- `parallel.causal`    CausVid under SP: the K/V cache sharded as the scheme shards K/V (Ulysses: all tokens of
                       a rank's heads; ring: a rank's token chunk of every block, passed around the ring).
- `parallel.causal_runner`  CausVid on one rank: the session table (open, next fragment, offload, restore,
                       close), prompts encoded on rank 0 and shared, collective cancel.
- `parallel.workers`   the group as Ray actors (`SPWorkerGroup`), what a Serve replica owns; CausVid sessions.
- `parallel.launch`    the group as local spawned processes with a hard deadline (tests, benchmarks).
- `parallel.generate`  `torchrun -m parallel.generate ...`: model.generate's CLI over a torchrun group.

Submodules are imported on use: `parallel.workers` imports Ray, the others only torch.
"""
