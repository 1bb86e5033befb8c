"""Held-out pairs scored for preference: does the model rank the chosen answer above the rejected one?

Per pair and model: the summed log-probability of each answer after its prompt. The tuned model's implicit
reward margin is beta * ((tuned - reference) on chosen - (tuned - reference) on rejected), and it is right on
a pair when that margin is positive (DPO's preference accuracy); the likelihood accuracy says whether a
model gives the chosen answer the higher log-probability outright. Every figure is per pair, so the
tuned model and its reference are compared on the same pairs with paired bootstrap intervals.

KTO's unpaired rows have no second answer to rank against: each row's implicit reward, beta * (tuned -
reference) on its answer, should be positive for a desirable answer and negative for an undesirable one,
and the label accuracy counts the rows where its sign agrees (the reference, at zero reward, is a coin).
Held-out pairs can be scored both ways (data.unpair). Dagster-free; torch is imported lazily.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lora_pipeline.ml.scoring.paired import mean_interval, paired_bootstrap


def answer_logps(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """The summed log-probability of answer_ids after prompt_ids."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return float(logps[len(prompt_ids) - 1:].sum())


def score_pairs(model, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per pair: chosen_logp, rejected_logp and correct (the chosen answer is the likelier), for the model as it is."""
    chosen = [answer_logps(model, p, c) for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"])]
    rejected = [answer_logps(model, p, r) for p, r in zip(pairs["prompt_ids"], pairs["rejected_ids"])]
    frame = pd.DataFrame({"chosen_logp": chosen, "rejected_logp": rejected})
    frame["correct"] = (frame["chosen_logp"] > frame["rejected_logp"]).astype(float)
    return frame


def score_completions(model, rows: pd.DataFrame) -> pd.DataFrame:
    """Per unpaired row: completion_logp (its answer after its prompt) and its label, for the model as it is."""
    logps = [answer_logps(model, p, c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"])]
    return pd.DataFrame({"completion_logp": logps, "label": rows["label"].astype(bool).to_numpy()})


def unpaired_scores(pair_scores: pd.DataFrame) -> pd.DataFrame:
    """score_pairs' frame as score_completions' for the rows data.unpair makes of the same pairs, in its order
    (each pair's chosen row, then its rejected row): pairs scored once give both reports."""
    logps = np.column_stack([pair_scores["chosen_logp"].to_numpy(), pair_scores["rejected_logp"].to_numpy()])
    return pd.DataFrame({"completion_logp": logps.reshape(-1), "label": np.tile([True, False], len(pair_scores))})


def score_on_base(base_dir: Path, adapters: dict[str, Path | None], pairs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """score_pairs (score_completions for unpaired rows: completion_ids and label) for each named adapter
    (None: the bare base) on one loaded base."""
    from transformers import AutoModelForCausalLM

    from lora_pipeline.ml.adapters import adapter_name, attach_adapters, using

    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map={"": "cpu"})
    attached = {adapter_name(name): path for name, path in adapters.items() if path is not None}
    model = attach_adapters(base, attached).eval() if attached else base.eval()
    score = score_completions if {"completion_ids", "label"} <= set(pairs.columns) else score_pairs
    scores = {}
    for name, path in adapters.items():
        if not attached:
            scores[name] = score(model, pairs)
            continue
        with using(model, None if path is None else adapter_name(name)):
            scores[name] = score(model, pairs)
    return scores


def preference_report(tuned: pd.DataFrame, reference: pd.DataFrame, beta: float, resamples: int = 2000,
                      margin: float = 0.0) -> dict:
    """The tuned model against its reference on the same pairs.

    preference_accuracy: per pair, 1 when the tuned model's implicit reward ranks the chosen answer above
    the rejected one (beta times its log-probability gain over the reference), 0 when below, 0.5 on a tie;
    the reference's own implicit reward is zero on every pair, a coin flip (0.5). likelihood_accuracy: per
    pair, 1 when the model gives the chosen answer the higher log-probability, for both models."""
    rewards = beta * ((tuned["chosen_logp"] - reference["chosen_logp"])
                      - (tuned["rejected_logp"] - reference["rejected_logp"]))
    correct = np.where(rewards > 0, 1.0, np.where(rewards < 0, 0.0, 0.5))
    coin = np.full(len(correct), 0.5)
    comparison = paired_bootstrap("preference_accuracy", "tuned", "reference", correct, coin,
                                  higher_is_better=True, resamples=resamples)
    return {
        "pairs": len(tuned),
        "preference_accuracy": {"tuned": mean_interval(correct, resamples).as_dict(),
                                "reference": mean_interval(coin, resamples).as_dict()},
        "likelihood_accuracy": {"tuned": mean_interval(tuned["correct"], resamples).as_dict(),
                                "reference": mean_interval(reference["correct"], resamples).as_dict()},
        "reward_margin": mean_interval(rewards.to_numpy(dtype=float), resamples).as_dict(),
        "logps": {name: {"chosen": float(frame["chosen_logp"].mean()), "rejected": float(frame["rejected_logp"].mean())}
                  for name, frame in (("tuned", tuned), ("reference", reference))},
        "comparison": comparison.as_dict(margin),
        "better_than_reference": bool(comparison.difference.low > margin),
    }


def label_report(tuned: pd.DataFrame, reference: pd.DataFrame, beta: float, resamples: int = 2000,
                 margin: float = 0.0) -> dict:
    """The tuned model against its reference on the same unpaired rows (score_completions frames).

    label_accuracy: per row, 1 when the sign of the implicit reward (beta times the tuned model's
    log-probability gain over the reference on the row's answer) agrees with its label, 0 when it disagrees,
    0.5 on a tie; the reference's own reward is zero on every row, a coin flip (0.5)."""
    labels = tuned["label"].to_numpy(dtype=bool)
    if not np.array_equal(labels, reference["label"].to_numpy(dtype=bool)):
        raise ValueError("the tuned and reference scores are not of the same rows: their labels differ")
    rewards = beta * (tuned["completion_logp"] - reference["completion_logp"]).to_numpy(dtype=float)
    agrees = np.where(rewards == 0, 0.5, np.where((rewards > 0) == labels, 1.0, 0.0))
    coin = np.full(len(agrees), 0.5)
    comparison = paired_bootstrap("label_accuracy", "tuned", "reference", agrees, coin,
                                  higher_is_better=True, resamples=resamples)
    return {
        "rows": len(tuned),
        "desirable": int(labels.sum()),
        "label_accuracy": {"tuned": mean_interval(agrees, resamples).as_dict(),
                           "reference": mean_interval(coin, resamples).as_dict()},
        "reward": {name: mean_interval(rewards[chosen], resamples).as_dict()
                   for name, chosen in (("desirable", labels), ("undesirable", ~labels)) if chosen.any()},
        "logps": {name: {side: float(frame["completion_logp"].to_numpy()[chosen].mean())
                         for side, chosen in (("desirable", labels), ("undesirable", ~labels)) if chosen.any()}
                  for name, frame in (("tuned", tuned), ("reference", reference))},
        "comparison": comparison.as_dict(margin),
        "better_than_reference": bool(comparison.difference.low > margin),
    }
