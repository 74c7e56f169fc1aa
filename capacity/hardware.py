"""GPU figures the projections divide by: vendor datasheet peaks, not measurements.

Dense (no 2:4 sparsity) FLOP/s; bandwidths per direction. Each entry cites its datasheet column.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2 ** 30
TERA = 1e12


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s: the DiT and T5
    tf32_flops: float  # dense TF32 peak, FLOP/s: the fp32 VAE's convolutions (cuDNN allows TF32 by default)
    memory_bytes: float  # HBM / GDDR capacity
    hbm_bw: float  # memory bandwidth, bytes/s
    link_bw: float  # GPU<->GPU, bytes/s per direction: NVLink, or PCIe peer-to-peer where there is none
    host_bw: float  # host<->GPU PCIe, bytes/s per direction (model offload)
    fp8_flops: float | None = None  # dense FP8 tensor-core peak, FLOP/s (scaled fp8 GEMMs); None: no fp8 cores


GPUS: dict[str, GPU] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: BF16 1,979, TF32 989 and FP8 3,958 TFLOPS "with
    # sparsity" (dense = half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (both directions), PCIe Gen5 128 GB/s.
    "H100": GPU("H100 SXM5 80GB", 989.4 * TERA, 494.7 * TERA, 80 * GB, 3.35e12, 450 * GB, 64 * GB, 1978.9 * TERA),
    # NVIDIA H200 datasheet, SXM column: same tensor cores as H100 (BF16 1,979 / TF32 989 / FP8 3,958 TFLOPS
    # sparse), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
    "H200": GPU("H200 SXM 141GB", 989.4 * TERA, 494.7 * TERA, 141 * GB, 4.8e12, 450 * GB, 64 * GB, 1978.9 * TERA),
    # NVIDIA A100 datasheet, 80GB SXM column: BF16 312 TFLOPS and TF32 156 TFLOPS dense, HBM2e 2,039 GB/s,
    # NVLink 600 GB/s, PCIe Gen4 64 GB/s. Ampere has no FP8 tensor cores.
    "A100": GPU("A100 SXM 80GB", 312 * TERA, 156 * TERA, 80 * GB, 2.039e12, 300 * GB, 32 * GB),
    # NVIDIA L40S datasheet: BF16 362.05, TF32 183 and FP8 733 TFLOPS dense (733 / 366 / 1,466 with sparsity),
    # 48 GB GDDR6 at 864 GB/s, no NVLink: PCIe Gen4 x16 64 GB/s (both directions) for GPU<->GPU and host alike.
    "L40S": GPU("L40S 48GB", 362.05 * TERA, 183 * TERA, 48 * GB, 864 * GB, 32 * GB, 32 * GB, 733 * TERA),
}
