"""Dense bf16 peak FLOP/s of a GPU, by its exact SKU: the denominator of MFU.

Figures are NVIDIA's datasheet "BF16 Tensor Core" numbers WITHOUT sparsity (the datasheets print the 2:4
sparse figure, twice these, with an asterisk):
  H100 SXM 989 (datasheet 1,979 sparse), H100 PCIe 756 (1,513), H100 NVL 835 (1,671) — H100 datasheet;
  H200 SXM 989 (1,979), H200 NVL 835 (1,671) — H200 datasheet; GH200 989 (its H100/H200 GPU at SXM clocks);
  A100 40 GB and 80 GB, SXM and PCIe alike 312 (624) — A100 datasheet;
  L40S 362 (733) — L40S datasheet; B200 2,250 (4.5 PFLOPS sparse) — HGX B200 datasheet.
Keys are the names ``torch.cuda.get_device_name()`` returns (nvidia-smi's product names), matched exactly
after dropping the "NVIDIA " prefix and case: a substring match would give an H100 PCIe the SXM's 989 and
report an MFU 24% too low (756 / 989). A card not in the table reports no MFU unless ``--peak-tflops`` names its peak.
"""
from __future__ import annotations

from typing import Optional

T = 1e12
PEAK_BF16_FLOPS = {
    "H100 80GB HBM3": 989 * T,       # H100 SXM5
    "H100 80GB HBM3E": 989 * T,
    "H100 SXM5 80GB": 989 * T,
    "H100 PCIE": 756 * T,
    "H100 NVL": 835 * T,
    "H200": 989 * T,                 # H200 SXM
    "H200 NVL": 835 * T,
    "GH200 480GB": 989 * T,
    "GH200 144G HBM3E": 989 * T,
    "A100-SXM4-40GB": 312 * T,
    "A100-SXM4-80GB": 312 * T,
    "A100-PCIE-40GB": 312 * T,
    "A100-PCIE-80GB": 312 * T,
    "A100 80GB PCIE": 312 * T,
    "L40S": 362 * T,
    "B200": 2250 * T,
}


def _key(name: str) -> str:
    key = " ".join(name.split()).upper()
    return key[len("NVIDIA "):] if key.startswith("NVIDIA ") else key


_TABLE = {_key(k): v for k, v in PEAK_BF16_FLOPS.items()}


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU named ``device_name`` (as CUDA reports it), or None if unknown."""
    return _TABLE.get(_key(device_name))


def device_peak_flops(peak_tflops: Optional[float] = None) -> Optional[float]:
    """The current CUDA device's peak in FLOP/s: ``peak_tflops`` (a user's figure, in TFLOP/s) wins;
    else the table's figure; None on the CPU or an unknown card (then no MFU is reported)."""
    if peak_tflops:
        return peak_tflops * T
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_bf16_flops(torch.cuda.get_device_name())
