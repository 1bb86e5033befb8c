"""The compute resource: which device trains, and what it supports."""

from typing import Literal

import dagster as dg
from pydantic import Field

from lora_pipeline.ml.precision import DeviceInfo, detect_device


class Compute(dg.ConfigurableResource):
    """The accelerator this run uses, detected unless pinned."""

    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        default="auto", description="Device to train on; 'auto' prefers CUDA, then Apple MPS, then the CPU."
    )

    def info(self) -> DeviceInfo:
        """The device and its capabilities."""
        detected = detect_device()
        if self.device in ("auto", detected.device):
            return detected
        if self.device == "cpu":
            return DeviceInfo(device="cpu")
        raise dg.Failure(f"compute.device is {self.device!r} but this machine offers {detected.device!r}")


class FixedCompute(Compute):
    """A compute resource that reports a fixed device without probing the machine (tests)."""

    gpu_count: int = Field(default=0, description="GPUs reported.")
    bf16_supported: bool = Field(default=False, description="Whether bf16 is reported as supported.")
    gpu_memory_gb: float = Field(default=0.0, description="Memory of each reported GPU, in GiB.")

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            device="cpu" if self.device == "auto" else self.device,
            gpu_count=self.gpu_count,
            bf16_supported=self.bf16_supported,
            gpu_memory_bytes=int(self.gpu_memory_gb * 2**30),
        )
