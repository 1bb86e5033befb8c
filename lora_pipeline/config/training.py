"""The training section of a model config: the optimizer and schedule, the step's levers, checkpoints, the
evaluation while training, the objective (SFT or a preference one) and several processes."""

from __future__ import annotations

from typing import Literal, Optional

import pydantic
from pydantic import Field

from lora_pipeline.config.base import StrictSection
from lora_pipeline.config.distributed import DistributedSettings
from lora_pipeline.config.preference import OBJECTIVES

class TrainingSettings(StrictSection):
    """Trainer hyper-parameters (TRL SFTTrainer)."""

    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the training split.")
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Stop after this many optimizer steps; overrides epochs."
    )
    batch_size: int = Field(default=4, ge=1, description="Sequences per device per forward pass.")
    grad_accumulation: int = Field(
        default=1, ge=1, description="Forward passes accumulated into one optimizer step."
    )
    learning_rate: float = Field(default=2e-4, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"
    ] = Field(default="cosine", description="Learning-rate schedule after warm-up.")
    warmup: float = Field(
        default=0.03,
        ge=0.0,
        description="Warm-up length: a fraction of all steps when below 1, a step count otherwise.",
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="Gradient clipping norm.")
    max_length: int = Field(
        default=512, ge=8, description="Longest training sequence in tokens; longer ones are truncated."
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into each max_length sequence (faster on short data).",
    )
    completion_only_loss: bool = Field(
        default=True,
        description="Compute the loss on the response tokens only: the output of single-turn rows, "
        "every assistant turn (with its end-of-turn marker) of conversations. Off: on every token.",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Recompute activations in the backward pass to save memory. 'auto': on for "
        "GPUs, off on CPU, where memory is rarely the limit and recomputing costs about 30% speed.",
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adafactor", "sgd"
    ] = Field(
        default="adamw_torch",
        description="Optimizer. paged_* keep their states in paged memory (bitsandbytes) to absorb spikes.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Mixed precision for the trainable path. 'auto': bf16 on GPUs that support it, "
        "fp16 on older GPUs, fp32 on CPU.",
    )
    padding_free: bool = Field(
        default=True,
        description="When not packing, run each batch as one row of its examples back to back, without padding "
        "(attention stays within each example). Off: pad every example to the batch's longest, as most trainers do; "
        "on alpaca-like data that is 30-40% padding.",
    )
    attention: Literal["auto", "dense"] = Field(
        default="auto",
        description="Attention in training. 'auto': each packed or padding-free example attends only to itself, "
        "computed per example (varlen Flash attention on CUDA where torch has it). 'dense': the model's own "
        "implementation over the whole row with a block-diagonal mask (same result, ~4x the score work when packing).",
    )
    dequant_cache: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="QLoRA: dequantize the frozen 4-bit weights once and train against that copy instead of "
        "dequantizing them in every forward and backward pass (bit-identical, faster, holds the weights in the "
        "compute dtype). 'auto': on CPU when the memory plan leaves room for it, off on GPUs.",
    )
    liger_kernel: bool = Field(
        default=False,
        description="Use Liger's Triton kernels for the model's layers (RMSNorm, RoPE, SwiGLU) on CUDA; needs the "
        "liger-kernel package.",
    )
    logging_steps: int = Field(default=5, ge=1, description="Log loss and throughput every N steps.")
    checkpoint_every: int = Field(
        default=100,
        ge=0,
        description="Save a resumable checkpoint (adapter, optimizer, scheduler, RNG, step) to the store "
        "every N optimizer steps; a killed run relaunched with the same config and data resumes from "
        "the newest one. 0: no checkpoints.",
    )
    eval_steps: int = Field(
        default=0,
        ge=0,
        description="Every N optimizer steps (and at the last), score the held-out split (formatted_dataset's eval "
        "split, its first eval.max_examples scorable examples, as eval_report scores them) with the adapter being "
        "trained: the per-example mean loss, eval_report's 'loss', drawn on the training loss curve and logged to "
        "the trackers as eval_loss. 0: no evaluation while training.",
    )
    early_stopping_patience: int = Field(
        default=0,
        ge=0,
        description="With eval_steps: stop training once the held-out loss has not improved on its best by more "
        "than early_stopping_threshold for this many evaluations in a row. 0: train every step.",
    )
    early_stopping_threshold: float = Field(
        default=0.0,
        ge=0.0,
        description="With early_stopping_patience: the least decrease of the held-out loss that counts as an "
        "improvement.",
    )
    keep_best: bool = Field(
        default=False,
        description="With eval_steps: publish the adapter as it was at the evaluation with the lowest held-out "
        "loss, not at the last step (its weights are kept in memory, and in each checkpoint for a resume).",
    )
    seed: int = Field(default=0, description="Seed for adapter initialisation, dropout and data order.")
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        default="sft",
        description="What the adapter learns. 'sft': the responses (TRL's SFT loss). Preference tuning, on "
        "preference rows (dataset.format preference or kto), with the preference section: 'dpo' (TRL's "
        "DPOTrainer), 'kto' (KTOTrainer; pairs are split into a desirable and an undesirable example), 'orpo' "
        "(trl.experimental.orpo's ORPOTrainer: no reference model, experimental in the pinned TRL 1.16). "
        "Preference tuning wants a far smaller learning_rate than SFT (5e-6 to 5e-5 on real models).",
    )
    init_adapter: Optional[str] = Field(
        default=None,
        description="Start from another model's current champion adapter (its model key, e.g. an SFT model) "
        "instead of a new LoRA: its LoRA settings and base are used, and with preference.reference auto it is "
        "the reference. The base must be that model's (base_model, quantization). A new champion there makes "
        "this model's adapter stale, and the lineage records which champion it started from.",
    )
    distributed: DistributedSettings = Field(
        default=DistributedSettings(),
        description="Several processes (GPUs, machines) training together through torchrun.",
    )

    @pydantic.model_validator(mode="after")
    def _evaluation_before_its_uses(self) -> "TrainingSettings":
        for key, value in (("early_stopping_patience", self.early_stopping_patience), ("keep_best", self.keep_best)):
            if value and not self.eval_steps:
                raise ValueError(f"training.{key} acts on the evaluations while training: set training.eval_steps "
                                 "(e.g. 20) too")
        if self.eval_steps and self.objective != "sft":
            raise ValueError(f"training.eval_steps: evaluation while training is SFT's only so far ({self.objective} "
                             "runs are scored on held-out pairs by eval_report); drop training.eval_steps")
        return self
