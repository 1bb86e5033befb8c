"""Training a LoRA / QLoRA adapter with TRL's SFTTrainer and PEFT. Dagster-free."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_pipeline.errors import LoraPipelineError
from lora_pipeline.ml.data.formatted import ensure_distinct_pad
from lora_pipeline.ml.batches import IGNORE_INDEX
from lora_pipeline.ml.base.modules import resolve_target_modules
from lora_pipeline.ml.base.precision import DeviceInfo, device_map_for, gradient_checkpointing_enabled, mixed_precision

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]
CheckpointFn = Callable[[Path, int], None]


@dataclass
class TrainResult:
    """What a training run produced and measured."""

    steps: int
    train_loss: float
    final_loss: float
    loss_history: list[tuple[int, float]]
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    trainable_parameters: int
    total_parameters: int
    peak_memory_bytes: int
    peak_memory_kind: str
    gradient_checkpointing: bool
    precision: str
    resumed_from_step: int = 0
    trainable_dtype: str = "float32"  # the dtype the adapter (and so its optimizer state) trained in
    target_modules: list[str] | str = field(default_factory=list)


def training_labels(train: "pd.DataFrame") -> list[list[int]]:
    """Per example, its token ids where the loss mask is set and -100 (ignored) elsewhere."""
    import numpy as np

    return [
        np.where(np.asarray(mask) == 1, np.asarray(ids), IGNORE_INDEX).tolist()
        for ids, mask in zip(train["input_ids"], train["loss_mask"])
    ]


class TrainingDivergedError(LoraPipelineError):
    """The loss became NaN or infinite: training stopped instead of saving a broken adapter."""


def _guarded(trainer_class):
    """The trainer class with a check after every micro-batch that the loss is finite."""

    class GuardedTrainer(trainer_class):
        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            value = float(loss.detach().float().mean())
            if value != value or value in (float("inf"), float("-inf")):
                raise TrainingDivergedError(
                    f"the training loss is {value} at step {self.state.global_step + 1}: training stopped and no "
                    "adapter was saved; lower training.learning_rate or training.max_grad_norm, or check the data"
                )
            return loss

    return GuardedTrainer


def _checkpoint_callback(on_checkpoint: CheckpointFn):
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        """Hands each checkpoint the Trainer has just written (complete on disk) to on_checkpoint."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                on_checkpoint(folder, state.global_step)

    return CheckpointCallback()


def _checkpoint_step(folder: Path) -> int:
    """The optimizer step a Trainer checkpoint was written at."""
    import json

    return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])


def lora_config(settings: "LoraSettings", model_type: str):
    """PEFT LoraConfig for the settings; 'auto' target modules resolved for the architecture."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(list(settings.target_modules), model_type),
        bias=settings.bias,
        modules_to_save=list(settings.modules_to_save) or None,
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        task_type=TaskType.CAUSAL_LM,
    )


def _keep_trainable_dtype(model, precision: str) -> str:
    """Put the trainable parameters in the dtype the run resolved, whatever the trainer cast them to; return its name.

    TRL's SFTTrainer casts every trainable parameter of a quantized model to bf16 (the QLoRA paper's
    recipe for GPUs). With fp32 resolved (CPUs, GPUs without bf16) that made every LoRA matmul and
    its input casts run in emulated bf16: over twice the time of the same step in fp32, and not the
    precision the metadata reported. bf16 stays bf16; fp16 mixed precision needs fp32 weights.
    """
    import torch

    wanted = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, parameter in model.named_parameters():
        # DoRA's magnitudes stay fp32 (as TRL keeps them): their updates can be below what bf16 represents.
        keep = torch.float32 if "lora_magnitude_vector" in name else wanted
        if parameter.requires_grad and parameter.dtype != keep:
            parameter.data = parameter.data.to(keep)
    return str(wanted).removeprefix("torch.")


def _reset_peak_memory(device: DeviceInfo) -> None:
    """Start the peak measurement now, so earlier stages in this process (quantization) do not count."""
    if device.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current resident size
    except OSError:
        pass  # elsewhere the process's lifetime peak is what there is


def _peak_memory_bytes(device: DeviceInfo) -> tuple[int, str]:
    if device.device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        peak_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return peak_kib * 1024, "process_peak_rss"
    except (OSError, StopIteration, ValueError):
        # ru_maxrss is in KiB on Linux, and starts from the parent's size in a child process.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def _progress_callback(progress: ProgressFn, tokens_per_step: float):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Reports step, loss, learning rate and throughput each time the trainer logs."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.started
            done = max(state.global_step, 1)
            progress(
                {
                    "step": state.global_step,
                    "max_steps": state.max_steps,
                    "loss": float(logs["loss"]),
                    "learning_rate": float(logs.get("learning_rate", 0.0)),
                    "tokens_per_second": tokens_per_step * done / elapsed if elapsed > 0 else 0.0,
                    "elapsed_seconds": elapsed,
                    "eta_seconds": elapsed / done * (state.max_steps - state.global_step),
                }
            )

    return ProgressCallback()


def train_adapter(
    base_dir: Path,
    train: "pd.DataFrame",
    out_dir: Path,
    lora: "LoraSettings",
    training: "TrainingSettings",
    device: DeviceInfo,
    base_model_name: str,
    progress: ProgressFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
    resume_from: Path | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on the (possibly quantized) base in base_dir and save it to out_dir.

    The training split is formatted_dataset's: token ids and a loss mask per example (which
    tokens to learn: the response, or everything when the config says so).

    Every training.checkpoint_every optimizer steps the Trainer's checkpoint (adapter, optimizer,
    scheduler, RNG states, step) is handed to on_checkpoint(folder, step); resume_from is such a
    folder to continue from, so a killed run ends with the same steps as an uninterrupted one.
    """
    import torch
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(training.seed)
    _reset_peak_memory(device)
    checkpointing = gradient_checkpointing_enabled(training.gradient_checkpointing, device)
    precision = mixed_precision(training.precision, device)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, device_map=device_map_for(device), trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    peft_config = lora_config(lora, model.config.model_type)

    ensure_distinct_pad(tokenizer)
    dataset = Dataset.from_dict(
        {"input_ids": [list(map(int, ids)) for ids in train["input_ids"]], "labels": training_labels(train)}
    )
    args = SFTConfig(
        output_dir=str(out_dir / "_trainer"),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.grad_accumulation,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optimizer,
        activation_checkpointing=checkpointing,  # transformers 5 name of gradient_checkpointing
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        max_length=training.max_length,
        packing=training.packing,
        logging_steps=training.logging_steps,
        save_strategy="steps" if training.checkpoint_every else "no",
        save_steps=training.checkpoint_every or 500,
        save_total_limit=1,  # the store keeps the published ones
        report_to=[],
        disable_tqdm=True,
        use_cpu=device.device == "cpu",
        seed=training.seed,
        data_seed=training.seed,
    )
    trainer = _guarded(SFTTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trainable_dtype = _keep_trainable_dtype(trainer.model, precision)
    # Progress goes through the callback below (and so to the Dagster run log), not raw prints.
    trainer.remove_callback(PrinterCallback)
    tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    sequences = len(trainer.train_dataset)
    tokens_per_step = tokens_per_epoch / max(1, sequences) * training.batch_size * training.grad_accumulation
    if progress is not None:
        trainer.add_callback(_progress_callback(progress, tokens_per_step))
    if on_checkpoint is not None:
        trainer.add_callback(_checkpoint_callback(on_checkpoint))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    logger.info("training %s trainable of %s parameters", trainable, total)

    resumed_step = _checkpoint_step(resume_from) if resume_from is not None else 0
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    train_seconds = float(result.metrics["train_runtime"])
    steps = int(trainer.state.global_step)
    trained_tokens = int(tokens_per_epoch * float(trainer.state.epoch or 0.0))
    history = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    peak, peak_kind = _peak_memory_bytes(device)

    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.peft_config["default"].base_model_name_or_path = base_model_name
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _remove_tree(out_dir / "_trainer")
    return TrainResult(
        steps=steps,
        train_loss=float(result.training_loss),
        final_loss=history[-1][1] if history else float(result.training_loss),
        loss_history=history,
        train_tokens=trained_tokens,
        train_seconds=train_seconds,
        tokens_per_second=trained_tokens / train_seconds if train_seconds > 0 else 0.0,
        trainable_parameters=int(trainable),
        total_parameters=int(total),
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        gradient_checkpointing=checkpointing,
        precision=precision,
        trainable_dtype=trainable_dtype,
        resumed_from_step=resumed_step,
        target_modules=sorted(peft_config.target_modules)
        if not isinstance(peft_config.target_modules, str)
        else peft_config.target_modules,
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
