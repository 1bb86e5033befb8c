"""DPO with LoRA through TRL's DPOTrainer, on pairs tokenized by this project (data.py). Dagster-free.

The starting adapter (another model's champion) is trained as PEFT's "default" adapter while TRL keeps a
frozen copy of it as "ref", the reference; with no starting adapter a fresh LoRA is trained and the
reference is the base with adapters disabled. Two traps are closed here: TRL casts a quantized model's
trainable weights to bf16 after copying the reference in fp32, so policy and reference differ before any
step (rewards nonzero at step 0, and small updates rounded away): the policy is restored from the
reference; and a run whose reward margins never move (loss stuck at ln 2) fails with what to check.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

STUCK_AFTER_LOGS = 3  # logged steps whose margins must not all be zero


class PreferenceTrainingError(RuntimeError):
    """Preference training cannot be trusted: a reference that is not what was asked, or margins that never move."""


@dataclass(frozen=True)
class PreferenceSettings:
    """What DPO needs beyond the LoRA and training settings."""

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


@dataclass
class PreferenceResult:
    """What training did: steps, the logged loss and reward margins and accuracies, wall time."""

    steps: int
    train_seconds: float
    loss_history: list[float] = field(default_factory=list)
    margin_history: list[float] = field(default_factory=list)
    accuracy_history: list[float] = field(default_factory=list)
    reference: str = "base"


def _pretokenized_trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on prompt_ids / chosen_ids / rejected_ids already made: TRL 1.16 always re-templates and
        tokenizes text columns (dpo_trainer.py _prepare_dataset), which would undo this project's rendering."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreTokenizedDPOTrainer


def train_preference(base_dir: Path, train: pd.DataFrame, out_dir: Path, settings: PreferenceSettings,
                     start_adapter: Path | None = None, lora=None, model_type: str | None = None) -> PreferenceResult:
    """Train DPO on the pairs in train (prompt_ids, chosen_ids, rejected_ids) and save the adapter to out_dir.

    start_adapter: an adapter folder to start from, which becomes the reference; without it a new LoRA
    (lora: LoraSettings) is trained against the base."""
    import torch
    from datasets import Dataset
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig

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
        model = PeftModel.from_pretrained(base, str(start_adapter), is_trainable=True)  # TRL adds the "ref" copy
    else:
        from lora_pipeline.ml.training.trainer import lora_config

        model = get_peft_model(base, lora_config(lora, model_type or base.config.model_type))
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    dataset = Dataset.from_dict({name: [list(map(int, ids)) for ids in train[name]] for name in columns})
    args = DPOConfig(
        output_dir=str(Path(out_dir) / "_trainer"), beta=settings.beta, loss_type=[settings.loss_type],
        label_smoothing=settings.label_smoothing, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size, max_steps=settings.max_steps,
        num_train_epochs=settings.epochs, max_length=settings.max_length, logging_steps=settings.logging_steps,
        bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", seed=settings.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )
    watch = _MarginWatch()

    class MarginCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            watch.record(logs or {})

    callback = MarginCallback()
    trainer = _pretokenized_trainer_class()(model=model, ref_model=None, args=args, train_dataset=dataset,
                                             processing_class=tokenizer, callbacks=[callback])
    reference = "base"
    if start_adapter is not None:
        _policy_from_reference(trainer.model)
        reference = f"the starting adapter ({start_adapter})"
        _require_reference_is_policy(trainer, dataset)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    watch.require_moved(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out_dir, selected_adapters=["default"], safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "_trainer", ignore_errors=True)
    return PreferenceResult(steps=trainer.state.global_step, train_seconds=round(seconds, 2),
                            loss_history=watch.losses, margin_history=watch.margins,
                            accuracy_history=watch.accuracies, reference=reference)


class _MarginWatch:
    """The logged DPO figures; refuses a run whose reward margins never left zero."""

    def __init__(self):
        self.losses, self.margins, self.accuracies = [], [], []

    def record(self, logs: dict) -> None:
        if "rewards/margins" in logs:
            self.losses.append(float(logs["loss"]))
            self.margins.append(float(logs["rewards/margins"]))
            self.accuracies.append(float(logs.get("rewards/accuracies", math.nan)))

    def require_moved(self, settings: PreferenceSettings) -> None:
        logged = self.margins[:STUCK_AFTER_LOGS]
        if len(logged) >= 2 and all(abs(margin) < 1e-7 for margin in logged[1:]):
            raise PreferenceTrainingError(
                f"the reward margins did not move in the first {len(logged)} logged steps (loss "
                f"{self.losses[-1]:.4f}, ln 2 is 0.6931): the policy is not learning from the pairs. Check "
                f"the learning rate ({settings.learning_rate:g}: too small rounds every update away), beta "
                f"({settings.beta:g}), that chosen and rejected differ after tokenization, and that the adapter "
                "is trainable")


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


def _require_reference_is_policy(trainer, dataset) -> None:
    """Before any step the reference must be the starting adapter: equal log-probabilities on a batch."""
    import torch

    batch = trainer.data_collator([dataset[index] for index in range(min(2, len(dataset)))])
    policy = completion_logps(trainer.model, batch)
    with torch.no_grad():
        reference = trainer.compute_ref_log_probs(trainer.model, batch)
    if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(policy, reference)):
        raise PreferenceTrainingError("the reference is not the starting adapter: their log-probabilities differ "
                                      "before any step")


def completion_logps(model, batch):
    """Summed log-probabilities of each row's completion tokens, (chosen, rejected), as DPO computes them."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1).chunk(2)
