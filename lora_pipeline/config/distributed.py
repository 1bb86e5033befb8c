"""The training.distributed section: how many processes train together, and how they share the model."""

from typing import Literal

import pydantic
from pydantic import Field

from lora_pipeline.config.base import StrictSection


class DistributedSettings(StrictSection):
    """Training on several GPUs or machines with torchrun and the Trainer's DDP or FSDP.

    One process (the default on a CPU or a single GPU) trains inside the Dagster step as always;
    several are started by torchrun through Dagster Pipes, and rank 0 writes the adapter.
    """

    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        default="auto",
        description="'ddp': every process holds the whole model and trains on its share of each batch (the usual "
        "choice for LoRA: only the adapter's gradients are exchanged). 'fsdp': weights, gradients and optimizer "
        "states sharded over the processes, for bases one GPU cannot hold (CUDA only; a 4-bit base then needs "
        "quantization.quant_storage equal to the compute dtype, which 'auto' picks). 'none': one process. "
        "'auto': ddp for several processes, none for one.",
    )
    nproc_per_node: str = Field(
        default="auto",
        description="Processes per machine, each with its own GPU: a number, or 'auto' for one per visible GPU "
        "(one on a CPU). Each process takes training.batch_size examples per step, so the effective batch is "
        "batch_size x grad_accumulation x processes.",
    )
    nnodes: int = Field(
        default=1, ge=1,
        description="Machines training together. Above 1, every machine runs the same step with "
        "PET_RDZV_ENDPOINT=HOST:PORT (machine 0's address) set, torchrun's c10d rendezvous.",
    )

    # Dagster's config types cannot spell a number-or-'auto': the choice is checked here.
    @pydantic.field_validator("nproc_per_node", mode="before")
    @classmethod
    def _count_or_auto(cls, value: object) -> str:
        text = str(value).strip()
        if text != "auto" and not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"nproc_per_node must be a positive number or 'auto', not {value!r}")
        return text
