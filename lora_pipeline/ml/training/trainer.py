"""Training a LoRA / QLoRA adapter with TRL's SFTTrainer and PEFT. Dagster-free."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_pipeline.ml.base.modules import resolve_target_modules
from lora_pipeline.ml.base.precision import DeviceInfo, device_map_for, gradient_checkpointing_enabled, mixed_precision
from lora_pipeline.ml.batches import IGNORE_INDEX, pad_id_of
from lora_pipeline.ml.data.formatted import ensure_distinct_pad
from lora_pipeline.ml.heap import long_lived_heap_frozen
from lora_pipeline.ml.training.distributed import Launch, check_world, local_rank, summed_over_ranks, trainer_arguments
from lora_pipeline.ml.training.held_out import EvaluationOutcome, HeldOut, evaluation_callback
from lora_pipeline.ml.training.step import step_trainer_class
from lora_pipeline.ml.training.telemetry import (
    CheckpointFn,
    LogFn,
    ProgressFn,
    checkpoint_callback,
    checkpoint_step,
    log_callback,
    peak_memory_bytes,
    progress_callback,
    reset_peak_memory,
)

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOptions:
    """What the training step does beyond the library defaults; each is one lever bench/step_levers.py measures."""

    lean_loss: bool = True  # our loss over the labelled positions instead of TRL's fused head (step.py)
    per_document_attention: bool = True  # attention within each packed / padding-free example (attention.py)
    padding_free: bool = True  # unpacked batches as one row without padding, instead of padded rows
    dequant_cache: bool = False  # frozen 4-bit weights dequantized once (dequant_cache.py)
    shared_dropout: bool = True  # one LoRA dropout mask per layer input (dropout.py)
    liger_kernel: bool = False  # Liger's layer kernels (CUDA)


def step_options(training: "TrainingSettings", device: DeviceInfo, dequant_cache: bool = False) -> StepOptions:
    """The step a config asks for on this device ('auto' resolved; dequant_cache as the memory plan decided)."""
    return StepOptions(
        # On CUDA TRL's Triton head never builds the full logits, which is what matters there.
        lean_loss=device.device != "cuda",
        per_document_attention=training.attention == "auto",
        padding_free=training.padding_free,
        dequant_cache=dequant_cache,
        liger_kernel=training.liger_kernel,
    )


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
    pad_fraction: float = 0.0  # share of the tokens in training batches that were padding
    step_options: dict = field(default_factory=dict)  # StepOptions as they ran
    dequantized_cache_bytes: int = 0
    world_size: int = 1  # processes that trained together (the Trainer's own count, checked against the launch)
    distributed_type: str = "NO"  # accelerate's: NO, MULTI_CPU, MULTI_GPU, FSDP
    eval_history: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss) while training
    best_step: int | None = None  # the evaluation with the lowest held-out loss
    best_eval_loss: float | None = None
    stopped_early_at: int | None = None  # the step early stopping ended training at
    published_step: int | None = None  # the step whose weights are the adapter (best_step with keep_best)


def training_labels(train: "pd.DataFrame") -> list[list[int]]:
    """Per example, its token ids where the loss mask is set and -100 (ignored) elsewhere."""
    import numpy as np

    return [
        np.where(np.asarray(mask) == 1, np.asarray(ids), IGNORE_INDEX).tolist()
        for ids, mask in zip(train["input_ids"], train["loss_mask"])
    ]


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
    options: StepOptions | None = None,
    report_to: tuple[str, ...] = (),
    on_log: LogFn | None = None,
    launch: Launch | None = None,
    held_out: "pd.DataFrame | None" = None,
    eval_batch_size: int = 8,
) -> TrainResult:
    """Train a LoRA adapter on the (possibly quantized) base in base_dir and save it to out_dir.

    The training split is formatted_dataset's: token ids and a loss mask per example (which
    tokens to learn: the response, or everything when the config says so).

    Every training.checkpoint_every optimizer steps the Trainer's checkpoint (adapter, optimizer,
    scheduler, RNG states, step) is handed to on_checkpoint(folder, step); resume_from is such a
    folder to continue from, so a killed run ends with the same steps as an uninterrupted one.
    options: the step's levers; by default what the config asks for on this device, without the
    dequantization cache (the memory plan decides that one). report_to: the Trainer's own trackers
    (tensorboard, wandb, ...); on_log(step, logs) receives every Trainer log (the pipeline's MLflow run).
    launch: a distributed launch when this process is one rank of it (under torchrun); every rank
    calls this function, rank 0 alone saves the adapter (FSDP: gathered whole) and gets the callbacks.
    held_out: the scorable held-out examples scored every training.eval_steps (held_out.py), in batches of
    eval_batch_size.
    """
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTTrainer

    from lora_pipeline.ml.training.attention import restore_attention, use_per_document_attention
    from lora_pipeline.ml.training.dequant_cache import cache_dequantized_weights
    from lora_pipeline.ml.training.dropout import share_dropout_masks

    options = options or step_options(training, device)
    torch.manual_seed(training.seed)
    reset_peak_memory(device)
    checkpointing = gradient_checkpointing_enabled(training.gradient_checkpointing, device)
    precision = mixed_precision(training.precision, device)
    distributed = launch is not None and launch.distributed
    # Each rank on its own GPU, never all on GPU 0.
    placement = {"": local_rank()} if distributed and device.device == "cuda" else device_map_for(device)
    model = AutoModelForCausalLM.from_pretrained(base_dir, device_map=placement, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "right"
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    cached_bytes = cache_dequantized_weights(model) if options.dequant_cache and quantized else 0
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    loaded_attention = use_per_document_attention(model) if options.per_document_attention else None
    peft_config = lora_config(lora, model.config.model_type)

    ensure_distinct_pad(tokenizer)
    trainer = step_trainer_class(SFTTrainer, lean=options.lean_loss)(
        model=model,
        args=_trainer_arguments(training, out_dir, device, precision, checkpointing, options, report_to, launch),
        train_dataset=_token_dataset(train, training.max_length),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    world = check_world(trainer, launch)
    trainable_dtype = _keep_trainable_dtype(trainer.model, precision)
    shared_dropouts = share_dropout_masks(trainer.model) if options.shared_dropout else 0
    # Progress goes through the callback below (and so to the Dagster run log), not raw prints.
    trainer.remove_callback(PrinterCallback)
    tokens_per_epoch = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    sequences = len(trainer.train_dataset)
    tokens_per_step = (tokens_per_epoch / max(1, sequences) * training.batch_size * training.grad_accumulation
                       * world["world_size"])
    if progress is not None:
        trainer.add_callback(progress_callback(progress, tokens_per_step))
    evaluations = EvaluationOutcome()
    if training.eval_steps and held_out is not None and len(held_out):
        # Before the checkpoint callback: a published checkpoint holds the best weights as of its step.
        trainer.add_callback(evaluation_callback(HeldOut(held_out, pad_id_of(tokenizer), eval_batch_size), training,
                                                 evaluations, trainer.log, resume_from))
    trainer.add_callback(checkpoint_callback(on_checkpoint))
    if on_log is not None:
        trainer.add_callback(log_callback(on_log))
    trainable, total = trainer.model.get_nb_trainable_parameters()
    logger.info("training %s trainable of %s parameters; step %s", trainable, total, options)

    resumed_step = checkpoint_step(resume_from) if resume_from is not None else 0
    with long_lived_heap_frozen():  # every step's autograd objects would otherwise set off full collections
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    train_seconds = float(result.metrics["train_runtime"])
    steps = int(trainer.state.global_step)
    trained_tokens = int(tokens_per_epoch * float(trainer.state.epoch or 0.0))
    history = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    peak, peak_kind = peak_memory_bytes(device)
    if loaded_attention is not None:
        restore_attention(trainer.model, loaded_attention)

    trainer.model.peft_config["default"].base_model_name_or_path = base_model_name
    _save_adapter(trainer, tokenizer, out_dir, launch)
    # The real tokens every rank trained on (after a resume: since it).
    ran_tokens = summed_over_ranks(trainer.tally.real_tokens)
    return TrainResult(
        steps=steps,
        train_loss=float(result.training_loss),
        final_loss=history[-1][1] if history else float(result.training_loss),
        loss_history=history,
        train_tokens=trained_tokens,
        train_seconds=train_seconds,
        tokens_per_second=ran_tokens / train_seconds if train_seconds > 0 else 0.0,
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
        pad_fraction=trainer.tally.pad_fraction,
        step_options={**asdict(options), "dequant_cache": bool(cached_bytes), "shared_dropout": shared_dropouts > 0},
        dequantized_cache_bytes=cached_bytes,
        eval_history=evaluations.history,
        best_step=evaluations.best_step,
        best_eval_loss=evaluations.best_loss,
        stopped_early_at=evaluations.stopped_early_at,
        published_step=evaluations.published_step if evaluations.history else steps,
        **world,
    )


def _save_adapter(trainer, tokenizer, out_dir: Path, launch: Launch | None) -> None:
    """Rank 0 writes the adapter and tokenizer; under FSDP every rank first helps gather the LoRA weights whole."""
    if launch is not None and launch.strategy == "fsdp":
        from lora_pipeline.ml.training.fsdp import save_full_adapter

        saved = save_full_adapter(trainer.model, out_dir)
    elif trainer.is_world_process_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out_dir, safe_serialization=True)
        saved = True
    else:
        saved = False
    if saved:
        tokenizer.save_pretrained(out_dir)
        _remove_tree(out_dir / "_trainer")


def _token_dataset(train: "pd.DataFrame", max_length: int):
    """The training split as TRL's tokenized dataset: ids (cut at max_length, as formatting already did) and labels."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [list(map(int, ids[:max_length])) for ids in train["input_ids"]],
            "labels": [labels[:max_length] for labels in training_labels(train)],
        }
    )


def _trainer_arguments(training: "TrainingSettings", out_dir: Path, device: DeviceInfo, precision: str,
                       checkpointing: bool, options: StepOptions, report_to: tuple[str, ...] = (),
                       launch: Launch | None = None):
    from trl import SFTConfig

    padding_free = options.padding_free and not training.packing
    return SFTConfig(
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
        # Padding-free batches are not cut by TRL; the ids were already cut at max_length.
        max_length=None if padding_free else training.max_length,
        packing=training.packing,
        padding_free=padding_free,
        use_liger_kernel=options.liger_kernel,
        logging_steps=training.logging_steps,
        save_strategy="steps" if training.checkpoint_every else "no",
        save_steps=training.checkpoint_every or 500,
        save_total_limit=1,  # the store keeps the published ones
        report_to=list(report_to),  # [] unless the config names the Trainer's own trackers
        disable_tqdm=True,
        use_cpu=device.device == "cpu",
        seed=training.seed,
        data_seed=training.seed,
        **trainer_arguments(launch, checkpointing),
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
