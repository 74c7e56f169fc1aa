"""Sequence parallelism as pure torch: one generation's tokens sharded over a process group.

- `parallel.group`     form the torch.distributed group (gloo on CPU, nccl on CUDA), its SP / CFG / ulysses /
                       ring sub-groups, bounded joining and naming of dead ranks.
- `parallel.heartbeat` each rank's heartbeat thread: the evidence that a peer is gone.
- `parallel.attention` the SP `TokenLayout`: token sharding with masked padding, Ulysses x ring attention.
- `parallel.causal`    CausVid under SP: the K/V cache sharded as the scheme shards K/V.
- `parallel.fsdp`      optional FSDP2 sharding of the DiT weights over the SP group.

What runs on these groups (runners, Ray workers, the torchrun CLI) is the engine layer: engine/.
"""
