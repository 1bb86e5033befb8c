"""Preference tuning with LoRA through TRL (DPO, KTO or ORPO, one setting apart), on rows tokenized by this
project (data.py). Dagster-free. What each objective's trainer needs lives in objectives.py.

The starting adapter (another model's champion) is trained as PEFT's "default" adapter. DPO and KTO measure
the policy against a reference: TRL keeps a frozen copy of the starting adapter as "ref"; with no starting
adapter a fresh LoRA is trained and the reference is the base with adapters disabled. ORPO has no reference:
its odds-ratio term compares the two answers under the policy alone. Two traps are closed here: TRL casts a
quantized model's trainable weights to bf16 after copying the reference in fp32, so policy and reference
differ before any step (rewards nonzero at step 0, and small updates rounded away): the policy is restored
from the reference and checked equal to it; and a run that does not learn (rewards that never leave zero,
or for ORPO an adapter that never changes) fails with what to check.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

STUCK_AFTER_LOGS = 3  # logged steps whose margins must not all be zero
OBJECTIVES = ("dpo", "kto", "orpo")


class PreferenceTrainingError(RuntimeError):
    """Preference training cannot be trusted: a reference that is not what was asked, or margins that never move."""


@dataclass(frozen=True)
class PreferenceSettings:
    """What preference tuning needs beyond the LoRA and training settings.

    objective: "dpo", "kto" (unpaired; pairs are unpaired into a desirable and an undesirable row) or "orpo"
    (no reference model; beta weighs its odds-ratio term against the answer's likelihood). loss_type is DPO's
    (TRL's names); KTO uses "kto" unless this is "apo_zero_unpaired", ORPO has one loss; label_smoothing is
    DPO's only, desirable_weight / undesirable_weight KTO's only. batch_size counts pairs per step, also for
    KTO on pairs (each pair is two of its rows); for KTO on unpaired rows it counts rows, at least 2 (KTO
    estimates its KL term from the other rows of the batch)."""

    objective: str = "dpo"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    learning_rate: float = 5e-6
    batch_size: int = 4
    max_steps: int = -1
    epochs: float = 1.0
    max_length: int = 512
    logging_steps: int = 1
    seed: int = 0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    grad_accumulation: int = 1
    warmup: float = 0.0  # a fraction of the steps below 1, a step count otherwise (transformers' warmup_steps)
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0: none

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


@dataclass
class PreferenceResult:
    """What training did: steps, the logged loss and reward margins and accuracies, wall time.

    Margins and accuracies are as the objective's trainer logs them: DPO's and KTO's rewards are beta times
    the log-probability gain over the reference (KTO logs no accuracy: empty; a margin only when a logged
    batch held both labels, else NaN); ORPO's are beta times the mean
    token log-probability under the policy. extra_history holds the objective's own figures (KTO: kl; ORPO:
    log_odds_ratio, nll_loss)."""

    steps: int
    train_seconds: float
    loss_history: list[float] = field(default_factory=list)
    margin_history: list[float] = field(default_factory=list)
    accuracy_history: list[float] = field(default_factory=list)
    reference: str = "base"
    objective: str = "dpo"
    extra_history: dict[str, list[float]] = field(default_factory=dict)
    logged_steps: list[int] = field(default_factory=list)  # the optimizer step of each logged figure
    resumed_from_step: int = 0


def load_policy(base_dir: Path, start_adapter: Path | None = None, lora=None, model_type: str | None = None):
    """(tokenizer, model): the base (prepared for k-bit training when quantized) with the starting adapter
    trainable, or a fresh LoRA (lora: LoraSettings)."""
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.base.loading import is_quantized_dir, require_safetensors_adapter

    tokenizer = AutoTokenizer.from_pretrained(start_adapter or base_dir)
    quantized = is_quantized_dir(Path(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": "cpu"} if not torch.cuda.is_available()
                                                else None, dtype=None if quantized else torch.float32)
    if quantized:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        _keep_cpu_4bit_trainable(base)
    if start_adapter is not None:
        require_safetensors_adapter(Path(start_adapter))
        return tokenizer, PeftModel.from_pretrained(base, str(start_adapter), is_trainable=True)
    from lora_pipeline.ml.training.trainer import lora_config

    return tokenizer, get_peft_model(base, lora_config(lora, model_type or base.config.model_type))


def train_preference(base_dir: Path, train: pd.DataFrame, out_dir: Path, settings: PreferenceSettings,
                     start_adapter: Path | None = None, lora=None, model_type: str | None = None,
                     progress: Callable[[str], None] | None = None, on_checkpoint=None, resume_from: Path | None = None,
                     on_log=None) -> PreferenceResult:
    """Train settings.objective on train and save the adapter to out_dir.

    train: pairs (prompt_ids, chosen_ids, rejected_ids) for every objective, or for KTO unpaired rows
    (prompt_ids, completion_ids, label). start_adapter: an adapter folder to start from, which becomes the
    reference (DPO, KTO); without it a new LoRA (lora: LoraSettings) is trained against the base. progress:
    called with a line per logged step (step, loss, reward margin and accuracy, time left) instead of the
    Trainer's printed dictionaries. Every settings.checkpoint_every steps the Trainer's checkpoint (adapter,
    optimizer, scheduler, RNG states) is handed to on_checkpoint(folder, step); resume_from is such a folder
    (the figures logged before it are not in the result). on_log(step, logs) receives every Trainer log."""
    from transformers import TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    from lora_pipeline.ml.preference.objectives import build_trainer, watch_for
    from lora_pipeline.ml.training.telemetry import checkpoint_callback, checkpoint_step, log_callback

    set_seed(settings.seed)  # a fresh LoRA's initial weights are drawn here, before the Trainer seeds anything
    tokenizer, model = load_policy(base_dir, start_adapter, lora, model_type)
    watch = watch_for(settings)

    logged_steps: list[int] = []

    class WatchCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            before = len(watch.losses)
            watch.record(logs)
            if len(watch.losses) > before:
                logged_steps.append(state.global_step)
                if progress is not None:
                    progress(_progress_line(state, logs, time.perf_counter() - started))

    callbacks = [WatchCallback(), checkpoint_callback(on_checkpoint), *([log_callback(on_log)] if on_log else [])]
    trainer, rows = build_trainer(settings, model, tokenizer, train, Path(out_dir) / "_trainer", callbacks)
    if progress is not None:
        trainer.remove_callback(PrinterCallback)
    if settings.objective == "orpo":
        reference = "none (ORPO has no reference model)"
        watch.before(trainer.model)
    elif start_adapter is not None:
        _policy_from_reference(trainer.model)
        reference = f"the starting adapter ({start_adapter})"
        _require_reference_is_policy(trainer, rows, paired=settings.objective == "dpo")
    else:
        reference = "base"
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    seconds = time.perf_counter() - started
    watch.require_moved(settings, trainer.model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out_dir, selected_adapters=["default"], safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return PreferenceResult(steps=trainer.state.global_step, train_seconds=round(seconds, 2),
                            loss_history=watch.losses, margin_history=watch.margins,
                            accuracy_history=watch.accuracies, reference=reference, objective=settings.objective,
                            extra_history=watch.extra, logged_steps=logged_steps,
                            resumed_from_step=checkpoint_step(resume_from) if resume_from is not None else 0)


def _progress_line(state, logs: dict, elapsed: float) -> str:
    """'step 10/66 loss 0.6512 reward margin +0.083 accuracy 0.75 eta 41s' from a logged step."""
    figures = [f"loss {logs['loss']:.4f}"] if "loss" in logs else []
    if "rewards/margins" in logs:
        figures.append(f"reward margin {logs['rewards/margins']:+.3f}")
    if "rewards/accuracies" in logs:
        figures.append(f"accuracy {logs['rewards/accuracies']:.2f}")
    if "kl" in logs:
        figures.append(f"kl {logs['kl']:.3f}")
    eta = elapsed / state.global_step * (state.max_steps - state.global_step) if state.global_step else 0.0
    return f"step {state.global_step}/{state.max_steps} " + " ".join(figures) + f" eta {eta:.0f}s"


def _keep_cpu_4bit_trainable(model) -> None:
    """bitsandbytes 0.50 on a CPU repacks a 4-bit weight for its AVX512-BF16 kernel at the first no-grad forward
    (TRL's reference pass), and that kernel has no backward: later gradients through the layer are lost."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _policy_from_reference(model) -> None:
    """The policy as the reference was copied (TRL cast it to bf16 afterwards for quantized bases)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:
                parameter.data = model.get_parameter(name.replace(".default.", ".ref.")).data.clone()


def _require_reference_is_policy(trainer, rows: list[dict], paired: bool = True) -> None:
    """Before any step the reference must be the starting adapter: equal log-probabilities on a batch.

    paired: DPO's batch (chosen rows, then rejected) and reference (chosen, rejected); else KTO's, whose
    reference pass returns (the rows' log-probabilities, their KL rows')."""
    import torch

    batch = trainer.data_collator(rows[:2])
    with torch.no_grad():
        reference = trainer.compute_ref_log_probs(trainer.model, batch)
    policy = completion_logps(trainer.model, batch) if paired else (sequence_logps(trainer.model, batch),)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(policy, reference)):
        raise PreferenceTrainingError("the reference is not the starting adapter: their log-probabilities differ "
                                      "before any step")


def sequence_logps(model, batch):
    """Summed log-probabilities of each row's completion tokens (completion_mask), one per row."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def completion_logps(model, batch):
    """Summed log-probabilities of each row's completion tokens, (chosen, rejected), as DPO computes them."""
    return sequence_logps(model, batch).chunk(2)
