"""The compute resource: which device trains, and what it supports."""

from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

from lora_pipeline.ml.base.precision import DeviceInfo, compute_choices, detect_device

if TYPE_CHECKING:
    from lora_pipeline.config.schema import ModelConfig


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

    def choices(self, model_config: "ModelConfig") -> dict:
        """The device, precision, compute dtype, gradient checkpointing and placement this config gets here."""
        return compute_choices(self.info(), model_config.quantization.compute_dtype, model_config.training.precision,
                               model_config.training.gradient_checkpointing)


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
