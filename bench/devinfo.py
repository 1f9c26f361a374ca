"""Device facts for the benchmarks: name, dense bf16 peak, memory bandwidth, peak memory."""

from __future__ import annotations

import resource

import torch

# (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s, HBM TB/s); first match wins
KNOWN = (
    ("H200", 989.0, 4.8),  # same compute as H100 SXM, faster HBM3e
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),  # SXM
    ("A100", 312.0, 2.0),
    ("L40S", 362.0, 0.864),
)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peaks(device: torch.device) -> tuple[float | None, float | None]:
    """(dense bf16 TFLOP/s, HBM TB/s) of a known GPU, else (None, None)."""
    name = device_name(device)
    for key, tflops, tbps in KNOWN:
        if key in name:
            return tflops, tbps
    return None, None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Max allocated CUDA bytes since the last reset; None on CPU (no per-run peak there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def process_max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
