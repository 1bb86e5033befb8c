"""Each preference objective's TRL trainer (DPO, KTO, ORPO in TRL 1.16) fed this project's token ids, and what
is watched to tell that a run learns. Dagster-free; torch and TRL are imported lazily.

TRL re-templates and re-tokenizes text columns in every trainer, which would undo this project's rendering
(data.py), so each trainer is subclassed at its one tokenizing step to pass the ids through:
- DPO: DPOTrainer._prepare_dataset returns prompt_ids / chosen_ids / rejected_ids as they are.
- KTO: KTOTrainer._prepare_dataset likewise for prompt_ids / completion_ids / label. KTO estimates its KL term
  from mismatched rows, each prompt with the answer of the row before it in the batch, and samples batches
  in order (TRL's default, "sequential"); TRL's own unpairing puts all chosen answers before all rejected
  ones, so a small batch would hold one label (no margins) and a pair's two rows could share a prompt in the
  KL term. Here pairs are shuffled (seeded) and each batch holds batch_size pairs, their chosen answers then
  their rejected ones, so every KL row pairs a prompt with another prompt's answer; unpaired rows are shuffled.
- ORPO (trl.experimental.orpo): ORPOTrainer.tokenize_row builds its prompt/chosen/rejected input_ids,
  attention masks and labels (prompt masked) from our ids instead of text; and its likelihood term is taken
  over the chosen answer only, as in the ORPO paper and as SFT trained the starting adapter (TRL's also
  covers the prompt, which would teach the adapter the user's turns).

What is watched: DPO's and KTO's rewards are beta times the gain over the reference, zero before the first
update; rewards that stay zero over the first logged steps mean nothing is learned. ORPO's rewards are the
policy's own mean log-probabilities, which differ batch to batch whether or not it learns, so for ORPO the
adapter's weights are compared before and after training instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from lora_pipeline.ml.preference.training import STUCK_AFTER_LOGS, PreferenceSettings, PreferenceTrainingError

KTO_LOSSES = ("kto", "apo_zero_unpaired")


def _common_args(settings: PreferenceSettings, output_dir: Path, batch_size: int) -> dict:
    """TrainingArguments every objective shares; TRL's configs default to bf16 and gradient checkpointing."""
    import torch

    return dict(output_dir=str(output_dir), learning_rate=settings.learning_rate,
                per_device_train_batch_size=batch_size, max_steps=settings.max_steps,
                num_train_epochs=settings.epochs, max_length=settings.max_length,
                gradient_accumulation_steps=settings.grad_accumulation, warmup_steps=settings.warmup,
                lr_scheduler_type=settings.lr_scheduler, max_grad_norm=settings.max_grad_norm,
                logging_steps=settings.logging_steps, bf16=False, activation_checkpointing=False, report_to="none",
                save_strategy="steps" if settings.checkpoint_every else "no", save_steps=settings.checkpoint_every or 500,
                seed=settings.seed, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, disable_tqdm=True)


def build_trainer(settings: PreferenceSettings, model, tokenizer, train: pd.DataFrame, output_dir: Path,
                  callbacks: list) -> tuple[object, list[dict]]:
    """(the objective's trainer over train, a few of the rows its collator takes, for checks)."""
    build = {"dpo": _dpo_trainer, "kto": _kto_trainer, "orpo": _orpo_trainer}[settings.objective]
    trainer, dataset = build(settings, model, tokenizer, train, output_dir, callbacks)
    return trainer, [dataset[index] for index in range(min(2, len(dataset)))]


def _ids(values) -> list[list[int]]:
    return [list(map(int, ids)) for ids in values]


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


def _dpo_trainer(settings, model, tokenizer, train, output_dir, callbacks):
    from datasets import Dataset
    from trl import DPOConfig

    columns = {name: _ids(train[name]) for name in ("prompt_ids", "chosen_ids", "rejected_ids")}
    # A batch is padded to its longest answer, twice (chosen and rejected); batches of pairs of like length
    # (transformers' LengthGroupedSampler: random megabatches, sorted inside) leave out most of that padding.
    lengths = [len(prompt) + max(len(chosen), len(rejected))
               for prompt, chosen, rejected in zip(*columns.values())]
    dataset = Dataset.from_dict({**columns, "length": lengths})
    args = DPOConfig(beta=settings.beta, loss_type=[settings.loss_type], label_smoothing=settings.label_smoothing,
                     train_sampling_strategy="group_by_length", length_column_name="length",
                     remove_unused_columns=False, **_common_args(settings, output_dir, settings.batch_size))
    trainer = _pretokenized_trainer_class()(model=model, ref_model=None, args=args, train_dataset=dataset,
                                             processing_class=tokenizer, callbacks=callbacks)
    return trainer, dataset


def kto_rows(train: pd.DataFrame, settings: PreferenceSettings) -> tuple[pd.DataFrame, int]:
    """(KTO's rows in the order its batches take them, with KL_completion_ids; the per-step batch in rows).

    Pairs: shuffled, batch_size pairs a batch, their chosen rows then their rejected rows; unpaired rows
    (prompt_ids, completion_ids, label): shuffled, batch_size rows a batch. Each row's KL completion is the
    answer of the row before it in its batch (the first takes the last), as TRL builds it."""
    rng = np.random.default_rng(settings.seed)
    paired = {"chosen_ids", "rejected_ids"} <= set(train.columns)
    if settings.batch_size < 2:
        raise ValueError(f"KTO needs batch_size of at least 2 {'pairs' if paired else 'rows'}: it estimates its "
                         f"KL term from the other prompts of the batch (got {settings.batch_size})")
    if not paired:
        rows = train.iloc[rng.permutation(len(train))]
        rows = pd.DataFrame({"prompt_ids": _ids(rows["prompt_ids"]), "completion_ids": _ids(rows["completion_ids"]),
                             "label": rows["label"].astype(bool).to_list()})
        per_step = settings.batch_size
    else:
        order = rng.permutation(len(train))
        blocks = []
        for start in range(0, len(order), settings.batch_size):
            block = train.iloc[order[start:start + settings.batch_size]]
            for side, label in (("chosen", True), ("rejected", False)):
                blocks.append(pd.DataFrame({"prompt_ids": _ids(block["prompt_ids"]),
                                            "completion_ids": _ids(block[f"{side}_ids"]), "label": label}))
        rows = pd.concat(blocks, ignore_index=True)
        per_step = 2 * settings.batch_size
    completions = rows["completion_ids"].to_list()
    rows["KL_completion_ids"] = [completions[index - 1 if index % per_step else min(index + per_step, len(rows)) - 1]
                                 for index in range(len(rows))]
    return rows, per_step


def _pretokenized_kto_class():
    from trl import KTOTrainer

    class PreTokenizedKTOTrainer(KTOTrainer):
        """KTOTrainer on prompt_ids / completion_ids / label (and KL_completion_ids, see kto_rows) already made:
        TRL 1.16 re-templates, tokenizes and unpairs text columns in _prepare_dataset (kto_trainer.py)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "completion_ids", "label"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreTokenizedKTOTrainer


def _kto_trainer(settings, model, tokenizer, train, output_dir, callbacks):
    from datasets import Dataset
    from trl import KTOConfig

    loss_type = settings.loss_type if settings.loss_type in KTO_LOSSES else "kto"  # DPO's loss types: KTO's own
    rows, per_step = kto_rows(train, settings)
    if loss_type != "kto":  # only "kto" estimates the KL term
        rows = rows.drop(columns="KL_completion_ids")
    dataset = Dataset.from_pandas(rows, preserve_index=False)
    args = KTOConfig(beta=settings.beta, loss_type=loss_type, train_sampling_strategy="sequential",
                     desirable_weight=settings.desirable_weight, undesirable_weight=settings.undesirable_weight,
                     **_common_args(settings, output_dir, per_step))
    trainer = _pretokenized_kto_class()(model=model, ref_model=None, args=args, train_dataset=dataset,
                                        processing_class=tokenizer, callbacks=callbacks)
    return trainer, dataset


def _pretokenized_orpo_class():
    from trl.experimental.orpo import ORPOTrainer

    class PreTokenizedORPOTrainer(ORPOTrainer):
        """ORPOTrainer on prompt_ids / chosen_ids / rejected_ids already made: TRL 1.16 tokenizes text rows in
        tokenize_row (and adds BOS / EOS when it thinks them missing), which would undo this project's rendering."""

        def tokenize_row(self, feature, model=None):
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            prompt = list(feature["prompt_ids"])
            batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):  # the answer is cut to fit max_length, as TRL does
                answer = list(feature[f"{side}_ids"])[:max(0, self.max_length - len(prompt))]
                batch[f"{side}_input_ids"] = prompt + answer
                batch[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                batch[f"{side}_labels"] = [-100] * len(prompt) + answer
            return batch

        def concatenated_forward(self, model, batch):
            """TRL's, with the likelihood term over the chosen answer's tokens (the paper's L_SFT, and what SFT
            learned) where TRL's covers the prompt too."""
            import torch.nn.functional as F

            outputs = super().concatenated_forward(model, batch)
            chosen_logits = outputs[2]  # (rows, positions - 1, vocab), position t predicting token t + 1
            labels = batch["chosen_labels"][:, 1:]
            labels = F.pad(labels, (0, chosen_logits.shape[1] - labels.shape[1]), value=-100)
            nll = F.cross_entropy(chosen_logits.reshape(-1, chosen_logits.shape[-1]).float(),
                                  labels.reshape(-1).to(chosen_logits.device), ignore_index=-100)
            return (*outputs[:4], nll, *outputs[5:])

    return PreTokenizedORPOTrainer


def _orpo_trainer(settings, model, tokenizer, train, output_dir, callbacks):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig

    if tokenizer.pad_token is None:  # DPO's and KTO's trainers do this themselves, ORPO's collator fails instead
        tokenizer.pad_token = tokenizer.eos_token
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    dataset = Dataset.from_dict({name: _ids(train[name]) for name in columns})
    args = ORPOConfig(beta=settings.beta, remove_unused_columns=False,
                      **_common_args(settings, output_dir, settings.batch_size))
    trainer = _pretokenized_orpo_class()(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                         callbacks=callbacks)
    return trainer, trainer.train_dataset


def watch_for(settings: PreferenceSettings):
    """What tells that this objective's run learns."""
    return {"dpo": _MarginWatch, "kto": _KTOWatch, "orpo": _ORPOWatch}[settings.objective]()


class _MarginWatch:
    """The logged DPO figures; refuses a run whose reward margins never left zero."""

    def __init__(self):
        self.losses, self.margins, self.accuracies, self.extra = [], [], [], {}

    def record(self, logs: dict) -> None:
        # TRL adds the figures of steps not yet logged to the closing summary too, which has train_loss, no loss
        if "rewards/margins" in logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.margins.append(float(logs["rewards/margins"]))
            self.accuracies.append(float(logs.get("rewards/accuracies", math.nan)))

    def require_moved(self, settings: PreferenceSettings, model=None) -> None:
        logged = self.margins[:STUCK_AFTER_LOGS]
        if len(logged) >= 2 and all(abs(margin) < 1e-7 for margin in logged[1:]):
            raise PreferenceTrainingError(
                f"the reward margins did not move in the first {len(logged)} logged steps (loss "
                f"{self.losses[-1]:.4f}, ln 2 is 0.6931): the policy is not learning from the pairs. Check "
                f"the learning rate ({settings.learning_rate:g}: too small rounds every update away), beta "
                f"({settings.beta:g}), that chosen and rejected differ after tokenization, and that the adapter "
                "is trainable")


class _KTOWatch(_MarginWatch):
    """KTO's logged figures (every step logs kl; margins only when a batch holds both labels); refuses a run
    whose rewards, desirable and undesirable, never left zero."""

    def __init__(self):
        super().__init__()
        self.extra = {"kl": []}
        self.moved = []

    def record(self, logs: dict) -> None:
        if "kl" in logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.margins.append(float(logs.get("rewards/margins", math.nan)))
            self.extra["kl"].append(float(logs["kl"]))
            self.moved.append(max(abs(float(logs.get(key, 0.0))) for key in ("rewards/chosen", "rewards/rejected")))

    def require_moved(self, settings: PreferenceSettings, model=None) -> None:
        logged = self.moved[:STUCK_AFTER_LOGS]
        if len(logged) >= 2 and all(reward < 1e-7 for reward in logged[1:]):
            raise PreferenceTrainingError(
                f"the rewards did not move in the first {len(logged)} logged steps (loss {self.losses[-1]:.4f}, "
                f"0.5 at zero reward): the policy is not learning from the rows. Check the learning rate "
                f"({settings.learning_rate:g}: too small rounds every update away), beta ({settings.beta:g}), "
                "that both labels occur, and that the adapter is trainable")


class _ORPOWatch(_MarginWatch):
    """ORPO's logged figures; refuses a run whose adapter weights did not change."""

    def __init__(self):
        super().__init__()
        self.extra = {"log_odds_ratio": [], "nll_loss": []}
        self.start = {}

    def record(self, logs: dict) -> None:
        if "log_odds_ratio" in logs and "loss" in logs:
            super().record(logs)
            for key in self.extra:
                self.extra[key].append(float(logs.get(key, math.nan)))

    def before(self, model) -> None:
        self.start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                      if parameter.requires_grad}

    def require_moved(self, settings: PreferenceSettings, model=None) -> None:
        now = dict(model.named_parameters())
        if self.start and all(bool((now[name].detach() == value).all()) for name, value in self.start.items()):
            raise PreferenceTrainingError(
                f"the adapter did not change in {len(self.losses)} logged steps (loss "
                f"{self.losses[-1] if self.losses else math.nan:.4f}): the policy is not learning from the pairs. "
                f"Check the learning rate ({settings.learning_rate:g}: too small rounds every update away) and "
                "that the adapter is trainable")
