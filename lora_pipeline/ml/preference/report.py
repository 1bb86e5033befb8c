"""eval_report for a preference model: the tuned adapter against its reference on held-out pairs, pair by pair.
Dagster-free; torch is imported lazily.

Every model (the tuned adapter, its reference, the current champion when there is one, the merged model) is
scored on the same pairs, so each figure is per pair and every comparison is paired: preference accuracy
(the model's implicit reward, beta times its log-probability gain over the reference, ranks the chosen
answer first; the reference itself scores 0.5, a coin), the likelihood accuracy (the chosen answer is
simply the likelier), the reward margin, and the chosen answers' per-token loss. The merged model must
give the adapter's log-probabilities (merge fidelity), the general-text probe must not rise against the
reference (forgetting), and a few held-out prompts are answered by the reference and the tuned model side
by side. The document keeps the SFT report's shape where the gates read it ('comparison': paired,
intervals, merged_vs_adapter_loss_change, forgetting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from lora_pipeline.ml.evaluation.pipeline import compare, forgetting_of, intervals_of
from lora_pipeline.ml.preference.evaluation import label_report, preference_report

PREFERENCE_METRIC = "preference_accuracy"
PER_PAIR_METRICS = ("preference_accuracy", "likelihood_accuracy", "reward_margin", "answer_loss")
# What the gates and the leaderboard read, compared paired against the reference.
COMPARED = ("preference_accuracy", "likelihood_accuracy", "reward_margin")


def answers_logps(model, prompts, answers, batch_size: int = 8) -> np.ndarray:
    """The summed log-probability of each answer after its prompt, several sequences per forward pass (right-padded,
    the padding masked out), as one would score them one by one."""
    import torch

    device = next(model.parameters()).device
    sequences = [(list(map(int, prompt)), list(map(int, answer))) for prompt, answer in zip(prompts, answers)]
    order = np.argsort([len(p) + len(a) for p, a in sequences])  # similar lengths together: less padding
    found = np.zeros(len(sequences))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        attention = torch.zeros_like(ids)
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, index in enumerate(chunk):
            prompt, answer = sequences[index]
            ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            attention[row, :len(prompt) + len(answer)] = 1
            answer_mask[row, len(prompt):len(prompt) + len(answer)] = True
        ids, attention, answer_mask = ids.to(device), attention.to(device), answer_mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
        logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        found[chunk] = (logps * answer_mask[:, 1:]).sum(-1).cpu().numpy()
    return found


def score_pairs_batched(model, pairs: pd.DataFrame, batch_size: int = 8) -> pd.DataFrame:
    """evaluation.score_pairs, batched: chosen_logp, rejected_logp and correct per pair."""
    frame = pd.DataFrame({
        "chosen_logp": answers_logps(model, pairs["prompt_ids"], pairs["chosen_ids"], batch_size),
        "rejected_logp": answers_logps(model, pairs["prompt_ids"], pairs["rejected_ids"], batch_size)})
    frame["correct"] = (frame["chosen_logp"] > frame["rejected_logp"]).astype(float)
    return frame


def score_rows(model, rows: pd.DataFrame, batch_size: int = 8) -> pd.DataFrame:
    """Pairs: score_pairs_batched; unpaired rows (KTO's): completion_logp and label per row."""
    if "chosen_ids" in rows.columns:
        return score_pairs_batched(model, rows, batch_size)
    return pd.DataFrame({"completion_logp": answers_logps(model, rows["prompt_ids"], rows["completion_ids"], batch_size),
                         "label": rows["label"].astype(bool).to_numpy()})


def per_row(scores: pd.DataFrame, reference: pd.DataFrame, rows: pd.DataFrame, beta: float) -> pd.DataFrame:
    """A model's figures per held-out pair (or unpaired row) against the reference's log-probabilities.

    Unpaired rows have no pair to rank: their preference_accuracy is whether the implicit reward's sign agrees
    with the row's label, and their reward_margin the reward in the labelled direction."""
    if "chosen_logp" in scores.columns:
        rewards = beta * ((scores["chosen_logp"] - reference["chosen_logp"])
                          - (scores["rejected_logp"] - reference["rejected_logp"]))
        frame = scores[["chosen_logp", "rejected_logp"]].copy()
        frame["likelihood_accuracy"] = scores["correct"].astype(float)
        frame["answer_loss"] = -scores["chosen_logp"] / rows["chosen_ids"].map(len).to_numpy()
    else:
        labels = scores["label"].to_numpy(dtype=bool)
        reward = beta * (scores["completion_logp"] - reference["completion_logp"])
        rewards = pd.Series(np.where(labels, reward, -reward))
        frame = scores[["completion_logp"]].copy()
        frame["answer_loss"] = -scores["completion_logp"] / rows["completion_ids"].map(len).to_numpy()
    frame["preference_accuracy"] = np.where(rewards > 0, 1.0, np.where(rewards < 0, 0.0, 0.5))
    frame["reward_margin"] = rewards.to_numpy(dtype=float)
    return frame


def evaluate_preferences(base_dir: Path, adapter_dir: Path, reference_dir: Path | None, merged_dir: Path,
                         pairs: pd.DataFrame, beta: float, resamples: int, margin: float, device,
                         champion_dir: Path | None = None, probe: bool = True, samples: int = 4,
                         max_new_tokens: int = 48, log: Callable[[str], None] = print,
                         trust_remote_code: bool = False, batch_size: int = 8) -> tuple[dict, pd.DataFrame]:
    """The metrics.json document and the per-pair table (examples.parquet) of a preference model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.adapters import attach_adapters, using
    from lora_pipeline.ml.base.precision import device_map_for
    from lora_pipeline.ml.evaluation.per_example import probe_losses
    from lora_pipeline.ml.evaluation.suite import probe_frame

    pairs = pairs.reset_index(drop=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map_for(device),
                                                trust_remote_code=trust_remote_code)
    adapters = {"adapter": adapter_dir, **({"reference": reference_dir} if reference_dir else {}),
                **({"champion": champion_dir} if champion_dir else {})}
    model = attach_adapters(base, adapters).eval()
    raw, probed, answers = {}, {}, {}
    general = probe_frame(tokenizer) if probe else None
    for name in ("reference", "adapter", "champion"):
        if name == "champion" and champion_dir is None:
            continue
        active = None if name == "reference" and reference_dir is None else name
        with using(model, active):  # None: adapters disabled, the base
            log(f"scoring {len(pairs)} held-out pairs with the {name}")
            raw[name] = score_rows(model, pairs, batch_size)
            if general is not None and name in ("reference", "adapter"):
                probed["base" if name == "reference" else name] = probe_losses(model, tokenizer, general, 8)
            if name in ("reference", "adapter") and samples:
                answers[name] = _answers(model, tokenizer, pairs.head(samples), max_new_tokens)
    del model, base
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, device_map=device_map_for(device),
                                                  trust_remote_code=trust_remote_code).eval()
    log("scoring the held-out pairs with the merged model")
    raw["merged"] = score_rows(merged, pairs, batch_size)
    del merged
    figures = {name: per_row(scores, raw["reference"], pairs, beta) for name, scores in raw.items()}
    paired_rows = "chosen_ids" in pairs.columns
    metrics = tuple(metric for metric in PER_PAIR_METRICS if metric in figures["adapter"].columns)
    logps = [column for column in ("chosen_logp", "rejected_logp", "completion_logp") if column in raw["adapter"]]
    table = pd.concat([frame.assign(model=name, pair=np.arange(len(frame))) for name, frame in figures.items()],
                      ignore_index=True)
    paired = [compare(metric, "adapter", "reference", figures, resamples, margin) for metric in COMPARED
              if metric in metrics]
    if "champion" in figures:
        paired.append(compare(PREFERENCE_METRIC, "adapter", "champion", figures, resamples, margin))
    adapter_loss = float(figures["adapter"]["answer_loss"].mean())
    reference_loss = float(figures["reference"]["answer_loss"].mean())
    comparison = {
        "examples": len(pairs),
        "paired": paired,
        "intervals": {name: intervals_of(frame, metrics, resamples) for name, frame in figures.items()},
        "merged_vs_adapter_loss_change": (float(figures["merged"]["answer_loss"].mean()) - adapter_loss)
        / adapter_loss if adapter_loss else 0.0,
        "adapter_vs_reference_answer_loss_change": (adapter_loss - reference_loss) / reference_loss
        if reference_loss else 0.0,
        "merged_max_logp_difference": float((raw["merged"][logps] - raw["adapter"][logps]).abs().max().max()),
    }
    if probed:
        comparison["forgetting"] = {**forgetting_of(probed, "adapter", resamples), "against": "reference"}
    answer_columns = ("chosen", "rejected") if paired_rows else ("completion", "label")
    document = {
        "paired": paired_rows,
        "preference": (preference_report if paired_rows else label_report)(raw["adapter"], raw["reference"], beta,
                                                                            resamples, margin),
        "models": {name: {metric: float(frame[metric].mean()) for metric in metrics} for name, frame in figures.items()},
        "comparison": comparison,
        "samples": [{"prompt": row["prompt"], **{column: row[column] for column in answer_columns},
                     "reference": answers["reference"][i], "tuned": answers["adapter"][i]}
                    for i, row in enumerate(pairs.head(samples).to_dict("records"))] if answers else [],
    }
    return document, table


def _answers(model, tokenizer, pairs: pd.DataFrame, max_new_tokens: int) -> list[str]:
    """Greedy answers to each pair's prompt (its stored ids, as training saw it)."""
    import torch

    found = []
    for ids in pairs["prompt_ids"]:
        inputs = torch.tensor([list(map(int, ids))], device=next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                                    if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        found.append(tokenizer.decode(output[0, inputs.shape[1]:], skip_special_tokens=True))
    return found


def report_markdown(document: dict, title: str, reference: str) -> str:
    """report.md: the verdict, the figures per model with intervals, the gates' inputs and the samples."""
    comparison, preference = document["comparison"], document["preference"]
    lines = [f"# {title}", "", f"{comparison['examples']} held-out pairs; reference: {reference}. Preference accuracy: "
             "the share of pairs whose implicit reward (beta x the log-probability gain over the reference) ranks the "
             "chosen answer first; the reference itself scores 0.5 (a coin).", "",
             "| model | preference accuracy (95% CI) | likelihood accuracy | reward margin | answer loss/token |",
             "|---|---|---|---|---|"]
    for name, intervals in comparison["intervals"].items():
        acc = intervals["preference_accuracy"]
        lines.append(f"| {name} | {acc['value']:.3f} ({acc['ci95'][0]:.3f} to {acc['ci95'][1]:.3f}) | "
                     f"{_value(intervals, 'likelihood_accuracy', '.3f')} | {intervals['reward_margin']['value']:+.4f} | "
                     f"{intervals['answer_loss']['value']:.4f} |")
    lines += ["", "## Paired comparisons", ""] + [f"- {entry['sentence']}" for entry in comparison["paired"]]
    lines += ["", f"Merged vs adapter: answer loss {comparison['merged_vs_adapter_loss_change']:+.3%}, largest "
              f"log-probability difference {comparison['merged_max_logp_difference']:.2e}."]
    if "forgetting" in comparison:
        probe = comparison["forgetting"]
        lines.append(f"Forgetting probe (general text, against the reference): {probe['base_loss']:.4f} -> "
                     f"{probe['adapter_loss']:.4f} ({probe['relative_change']:+.1%}).")
    lines.append(f"Verdict, tuned vs reference on preference accuracy: {preference['comparison']['verdict']}.")
    if document["samples"]:
        lines += ["", "## Samples (held-out prompts)", ""]
        for sample in document["samples"]:
            given = [f"- {name}: {sample[name]!r}" for name in ("chosen", "rejected", "completion", "label")
                     if name in sample]
            lines += [f"**Prompt:** {sample['prompt'][-200:]!r}", "", *given,
                      f"- reference: {sample['reference']!r}", f"- tuned: {sample['tuned']!r}", ""]
    return "\n".join(lines) + "\n"


def card_section(document: dict, made_by: str) -> str:
    """The model card's evaluation section for a preference model."""
    intervals = document["comparison"]["intervals"]
    rows = [f"| {name} | {values['preference_accuracy']['value']:.3f} ({values['preference_accuracy']['ci95'][0]:.3f}"
            f" to {values['preference_accuracy']['ci95'][1]:.3f}) | {_value(values, 'likelihood_accuracy', '.3f')} |"
            for name, values in intervals.items()]
    return "\n".join(["", "## Evaluation", "", f"On {document['comparison']['examples']} held-out preference pairs, "
                      f"reference {document.get('reference')}, by {made_by}:", "",
                      "| model | preference accuracy (95% CI) | likelihood accuracy |", "|---|---|---|", *rows, ""])


def _value(intervals: dict, metric: str, spec: str) -> str:
    """A metric's mean for a table cell, or n/a (unpaired rows have no likelihood accuracy)."""
    return format(intervals[metric]["value"], spec) if metric in intervals else "n/a"
