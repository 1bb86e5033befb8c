"""formatted_dataset's side for preference rows: pairs (or KTO's unpaired rows) rendered, tokenized, split and
checked. Dagster-free.

Refusals name the row and the field (a pair whose answers are equal, an empty answer, a template that cannot
render it). Duplicate pairs are dropped and counted; a pair longer than training.max_length is kept (TRL
truncates it) and counted, and the check refuses more of them than dataset.max_truncation_rate allows, with
the max_length that would keep 95% and 99% whole, as for SFT. The split is by prompt, so every pair of a
prompt is on one side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from lora_pipeline.ml.data.quality import CheckOutcome, LengthAdvice, over_length_problem, over_length_rate
from lora_pipeline.ml.data.templates import Template
from lora_pipeline.ml.preference.data import pairs_of, tokenize_pairs

# The answer columns of each preference format's formatted splits.
ANSWER_COLUMNS = {"preference": ("chosen_ids", "rejected_ids"), "kto": ("completion_ids",)}


@dataclass
class FormattedPreferences:
    """The formatted splits of preference rows, their counts and each example's full length in tokens."""

    format: str
    train: pd.DataFrame
    evaluation: pd.DataFrame
    counts: dict
    lengths: np.ndarray  # per example: the prompt and its longest answer

    @property
    def advice(self) -> LengthAdvice:
        return LengthAdvice.of(self.lengths, self.counts["max_length"])


def preference_rows(frame: pd.DataFrame, fmt: str, where: Callable[[int], str], system_prompt: str | None = None):
    """Every row parsed: pairs (Pair) for 'preference', unpaired rows for 'kto'; a DataError names the bad row."""
    if fmt == "kto":
        from lora_pipeline.ml.preference.data import kto_rows_of

        return kto_rows_of(frame, where, system_prompt)
    return pairs_of(frame, where, system_prompt)


def format_preferences(frame: pd.DataFrame, fmt: str, where: Callable[[int], str], tokenizer, template: Template,
                       eval_fraction: float, max_length: int, system_prompt: str | None = None) -> FormattedPreferences:
    """Render and tokenize preference rows ('preference' pairs or 'kto' rows), drop duplicates, split by prompt."""
    rows = preference_rows(frame, fmt, where, system_prompt)
    if fmt == "kto":
        from lora_pipeline.ml.preference.data import tokenize_kto_rows

        table = tokenize_kto_rows(rows, tokenizer, template, where, eval_fraction, max_length).frame
    else:
        table = tokenize_pairs(rows, tokenizer, template, where, eval_fraction, max_length).frame
    # The prompt as messages, for the checks that hand it to other tools (template fidelity, samples).
    table["prompt_messages"] = [json.dumps(row.prompt, ensure_ascii=False) for row in rows]
    answers = ANSWER_COLUMNS[fmt]
    identity = table[["prompt", *[column.removesuffix("_ids") for column in answers],
                      *(["label"] if fmt == "kto" else [])]].astype(str).agg("\x1f".join, axis=1)
    duplicates = identity.duplicated()
    table = table[~duplicates].reset_index(drop=True)
    lengths = (table["prompt_ids"].map(len) + np.max([table[column].map(len) for column in answers], axis=0)).to_numpy()
    held_out = table.pop("held_out").to_numpy(dtype=bool)
    train, evaluation = table[~held_out].reset_index(drop=True), table[held_out].reset_index(drop=True)
    counts = {"rows_in": len(frame), "duplicates": int(duplicates.sum()), "train_rows": len(train),
              "eval_rows": len(evaluation), "over_max_length": int((lengths > max_length).sum()),
              "max_length": max_length,
              "train_tokens": int(sum(lengths[~held_out])) if len(lengths) else 0}
    if fmt == "kto":
        counts["desirable"] = int(table["label"].sum())
        counts["undesirable"] = int(len(table) - table["label"].sum())
    return FormattedPreferences(fmt, train, evaluation, counts, lengths)


def check_preferences(fmt: str, train: pd.DataFrame, evaluation: pd.DataFrame, eos_token_id: int | None,
                      max_truncation_rate: float, advice: LengthAdvice | None) -> CheckOutcome:
    """Both splits against the pandera schema of formatted preference examples (a prompt, answers that are not
    empty, end with one EOS and, for pairs, differ), and the share over max_length against the limit."""
    import pandera.pandas as pa

    answers = ANSWER_COLUMNS[fmt]
    problems = []
    for name, split in (("train", train), ("eval", evaluation)):
        try:
            _schema(fmt).validate(_summary(split, answers, eos_token_id), lazy=True)
        except pa.errors.SchemaErrors as errors:
            first = errors.failure_cases.iloc[0]
            problems.append(f"{name}: {errors.failure_cases['index'].nunique()} example(s) fail, first at row "
                            f"{first['index']}: {first['check']}")
    examples = len(train) + len(evaluation)
    over = advice.longer if advice is not None else 0
    rate = over_length_rate(over, 0, examples)
    if rate > max_truncation_rate:
        problems.append(over_length_problem(rate, max_truncation_rate, over, 0, advice.tokens_beyond if advice else None,
                                            advice))
    figures = {"examples": examples, "over_max_length": over, "truncation_rate": rate,
               "max_truncation_rate": max_truncation_rate,
               **({} if advice is None else {"max_length_keeping_95%": advice.keeps_95,
                                             "max_length_keeping_99%": advice.keeps_99})}
    if problems:
        return CheckOutcome(False, "; ".join(problems), figures)
    kind = "pairs" if fmt == "preference" else "examples"
    return CheckOutcome(True, f"{examples} {kind}: a prompt, answers with text ending in one EOS"
                        + (", chosen and rejected differ" if fmt == "preference" else "")
                        + f"; over max_length {rate:.1%} within {max_truncation_rate:.1%}", figures)


def _summary(split: pd.DataFrame, answers: tuple[str, ...], eos_token_id: int | None) -> pd.DataFrame:
    summary = pd.DataFrame({"prompt_tokens": split["prompt_ids"].map(len)})
    for column in answers:
        name = column.removesuffix("_ids")
        summary[f"{name}_tokens"] = split[column].map(len)
        summary[f"{name}_ends_with_eos"] = split[column].map(
            lambda ids: eos_token_id is None or (len(ids) > 0 and int(ids[-1]) == eos_token_id)).astype(bool)
    if len(answers) == 2:
        summary["answers_differ"] = [list(a) != list(b) for a, b in zip(split[answers[0]], split[answers[1]])]
    return summary


def _schema(fmt: str):
    import pandera.pandas as pa

    answers = [column.removesuffix("_ids") for column in ANSWER_COLUMNS[fmt]]
    columns = {"prompt_tokens": pa.Column(checks=pa.Check.ge(1, error="has prompt tokens"))}
    for name in answers:
        columns[f"{name}_tokens"] = pa.Column(checks=pa.Check.ge(2, error=f"{name} has tokens beyond its EOS"))
        columns[f"{name}_ends_with_eos"] = pa.Column(bool, checks=pa.Check.eq(True, error=f"{name} ends with EOS"))
    if fmt == "preference":
        columns["answers_differ"] = pa.Column(bool, checks=pa.Check.eq(True, error="chosen and rejected differ"))
    return pa.DataFrameSchema(columns, name=f"formatted_{fmt}", strict=True)
