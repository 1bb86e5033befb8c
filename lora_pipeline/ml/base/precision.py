"""Device and dtype choices that depend on the hardware. Dagster-free; torch imported lazily."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """What the training machine offers."""

    device: str  # "cuda", "mps" or "cpu"
    gpu_count: int = 0
    bf16_supported: bool = False
    gpu_memory_bytes: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.device in ("cuda", "mps")


def detect_device() -> DeviceInfo:
    """Look at the machine: CUDA GPUs first, then Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return DeviceInfo(
            device="cuda",
            gpu_count=count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            gpu_memory_bytes=min(torch.cuda.get_device_properties(i).total_memory for i in range(count)),
        )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceInfo(device="mps", gpu_count=1)
    return DeviceInfo(device="cpu")


def compute_dtype_name(requested: str, device: DeviceInfo) -> str:
    """Resolve 'auto' to the dtype that is fast and safe on this device."""
    if requested != "auto":
        return requested
    if device.device == "cuda":
        return "bfloat16" if device.bf16_supported else "float16"
    return "float32"


def mixed_precision(requested: str, device: DeviceInfo) -> str:
    """Resolve the trainer's mixed precision ('bf16', 'fp16' or 'fp32')."""
    if requested != "auto":
        return requested
    if device.device == "cuda":
        return "bf16" if device.bf16_supported else "fp16"
    return "fp32"


def gradient_checkpointing_enabled(requested: str, device: DeviceInfo) -> bool:
    """Resolve 'auto': on for GPUs, where memory is scarce; off on CPU, where it only costs time."""
    if requested == "auto":
        return device.is_gpu
    return requested == "on"


def device_map_for(device: DeviceInfo) -> dict[str, str | int]:
    """Place the whole model on one device (multi-GPU placement belongs to accelerate launch)."""
    return {"": 0} if device.device == "cuda" else {"": device.device}


def torch_dtype(name: str):
    """torch dtype from its name."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def compute_choices(device: DeviceInfo, compute_dtype: str, precision: str, gradient_checkpointing: str) -> dict:
    """What the run will use on this device for the config's settings ('auto' resolved), as plain data."""
    return {
        "device": device.device,
        "gpu_count": device.gpu_count,
        "gpu_memory_gib": round(device.gpu_memory_bytes / 2**30, 1),
        "bf16_supported": device.bf16_supported,
        "compute_dtype": compute_dtype_name(compute_dtype, device),
        "precision": mixed_precision(precision, device),
        "gradient_checkpointing": gradient_checkpointing_enabled(gradient_checkpointing, device),
        "device_map": device_map_for(device),
    }
