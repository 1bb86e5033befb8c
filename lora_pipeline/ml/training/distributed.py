"""Training on several processes with the engines the field already uses: torchrun starts the ranks,
the Trainer (accelerate) runs DDP or FSDP over them. Dagster-free; torch imported lazily.

What is here: the launch a config asks for on a device (`plan_launch`), the torchrun command line,
the Trainer arguments a distributed run needs, and the guards against the silent fallbacks (a rank
training alone with world size 1, FSDP quietly run as DDP). The entry point each rank runs is
lora_pipeline/torchrun/worker.py; the asset starts it through Dagster Pipes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.base.precision import DeviceInfo

# The Trainer's distributed types (accelerate's DistributedType names) each strategy must end up in.
EXPECTED_TYPES = {"ddp": ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"), "fsdp": ("FSDP",)}
# torchrun reads its rendezvous settings from these variables as well as from flags (PET_ = its prefix).
RDZV_ENDPOINT_VARIABLE = "PET_RDZV_ENDPOINT"


@dataclass(frozen=True)
class Launch:
    """How a training runs: its strategy and processes ('auto' resolved for the device)."""

    strategy: str  # "none" (one process, in the Dagster step), "ddp" or "fsdp"
    nproc_per_node: int
    nnodes: int = 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def as_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def plan_launch(settings, device: DeviceInfo) -> Launch:
    """The launch for training.distributed on this device; refuses what would silently run otherwise.

    nproc_per_node 'auto': one process per GPU on CUDA, one process elsewhere (a CPU's cores already
    serve one process's matmuls). strategy 'auto': DDP for several processes, none for one."""
    nproc = _processes(settings.nproc_per_node, device)
    world = nproc * settings.nnodes
    strategy = settings.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if strategy == "none" and world > 1:
        raise ConfigError(f"training.distributed.strategy: 'none' trains in one process, but nproc_per_node x "
                          f"nnodes = {world}; use ddp or fsdp, or nproc_per_node: 1")
    if strategy == "fsdp" and device.device != "cuda":
        # accelerate turns an FSDP config into plain DDP when use_cpu is set: refuse instead of pretending.
        raise ConfigError(f"training.distributed.strategy: fsdp needs CUDA GPUs (on {device.device} accelerate "
                          "would quietly run DDP); use ddp here")
    if device.device == "cuda" and nproc > device.gpu_count:
        raise ConfigError(f"training.distributed.nproc_per_node: {nproc} processes, but this machine has "
                          f"{device.gpu_count} GPU(s); each rank needs its own")
    if world == 1:
        strategy = "none"
    return Launch(strategy=strategy, nproc_per_node=nproc, nnodes=settings.nnodes)


def _processes(requested: str, device: DeviceInfo) -> int:
    if requested == "auto":
        return max(device.gpu_count, 1) if device.device == "cuda" else 1
    return int(requested)


def torchrun_command(launch: Launch, module: str, args: list[str], environ: dict | None = None) -> list[str]:
    """The torchrun command line that starts launch.nproc_per_node ranks of `python -m module args`.

    One node: a standalone rendezvous on a free local port. Several: the c10d rendezvous at
    $PET_RDZV_ENDPOINT (node 0's host:port, the same on every node), as torchrun documents it."""
    environ = os.environ if environ is None else environ
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.nproc_per_node),
               "--nnodes", str(launch.nnodes)]
    if launch.nnodes == 1:
        command.append("--standalone")
    else:
        endpoint = environ.get(RDZV_ENDPOINT_VARIABLE)
        if not endpoint:
            raise ConfigError(f"training.distributed.nnodes: {launch.nnodes} nodes need a rendezvous: set "
                              f"{RDZV_ENDPOINT_VARIABLE}=HOST:PORT (node 0's address) on every node")
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                    "--rdzv-id", environ.get("PET_RDZV_ID", "lora-pipeline")]
    # Each rank gets OMP_NUM_THREADS from torchrun (1 unless set): the machine's cores shared out.
    return [*command, "-m", module, *args]


def threads_per_rank(launch: Launch) -> int:
    """CPU threads each rank's matmuls may use: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // launch.nproc_per_node)


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node (0 outside torchrun): the GPU it owns."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def trainer_arguments(launch: Launch | None, checkpointing: bool) -> dict:
    """The Trainer arguments a distributed run needs, as the anchors set them.

    No unused-parameter search (LoRA's graph is static; the search costs a pass over every
    parameter each step); non-reentrant checkpointing (the reentrant one marks a variable ready
    twice under DDP); FSDP: full-shard of the decoder layers, the LoRA weights gathered whole on save."""
    if launch is None or not launch.distributed:
        return {}
    arguments: dict = {"ddp_find_unused_parameters": False}
    if checkpointing:
        arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if launch.strategy == "fsdp":
        arguments["fsdp"] = "full_shard auto_wrap"
        arguments["fsdp_config"] = {"version": 2, "state_dict_type": "FULL_STATE_DICT",
                                    "cpu_ram_efficient_loading": False,
                                    "activation_checkpointing": False}  # the Trainer's own flag does it
    return arguments


def check_world(trainer, launch: Launch | None) -> dict:
    """Assert the Trainer runs the world the launch asked for; the facts recorded in the adapter's metadata.

    Catches torchrun without use_cpu (each rank trains alone, world size 1), a launcher that started
    fewer processes than asked, and FSDP degraded to DDP."""
    world_size = int(trainer.args.world_size)
    distributed_type = str(getattr(trainer.accelerator.state.distributed_type, "name",
                                   trainer.accelerator.state.distributed_type))
    if launch is None or not launch.distributed:
        return {"world_size": world_size, "distributed_type": distributed_type}
    if world_size != launch.world_size:
        raise RuntimeError(f"distributed training asked for world size {launch.world_size}, but the Trainer runs "
                           f"world size {world_size} ({distributed_type}): each rank would train alone")
    if distributed_type not in EXPECTED_TYPES[launch.strategy]:
        raise RuntimeError(f"distributed training asked for {launch.strategy}, but the Trainer runs "
                           f"{distributed_type}")
    return {"world_size": world_size, "distributed_type": distributed_type}


def summed_over_ranks(value: int) -> int:
    """A count summed over every rank (the value itself outside a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return int(total.item())
