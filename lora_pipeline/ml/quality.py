"""Checks of the formatted dataset: every example trainable, EOS where it belongs, no leakage. Dagster-free."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, a one-line description and figures for the UI."""

    passed: bool
    description: str
    figures: dict


def formatted_schema():
    """pandera schema of a formatted split: non-empty text and tokens, a trained token, EOS unless truncated."""
    import pandera.pandas as pa

    def trained_tokens(mask) -> bool:
        return int(np.asarray(mask).sum()) > 0

    return pa.DataFrameSchema(
        {
            "text": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
            "input_ids": pa.Column(checks=pa.Check(lambda ids: len(ids) > 0, element_wise=True,
                                                   error="has tokens")),
            "loss_mask": pa.Column(checks=pa.Check(trained_tokens, element_wise=True,
                                                   error="has at least one trained token")),
            "tokens": pa.Column(checks=pa.Check.ge(1)),
            "truncated": pa.Column(bool),
            "ends_with_eos": pa.Column(bool),
            "content_hash": pa.Column(nullable=False),
        },
        checks=[
            pa.Check(lambda frame: frame["ends_with_eos"] | frame["truncated"],
                     error="every example that is not truncated ends with exactly one EOS"),
        ],
        name="formatted_split",
        strict=False,
    )


def check_formatted(
    train: pd.DataFrame, evaluation: pd.DataFrame, max_truncation_rate: float, too_long_dropped: int = 0
) -> CheckOutcome:
    """The pandera schema on both splits, and the share of over-long examples (truncated or dropped) against the limit."""
    import pandera.pandas as pa

    problems = []
    for name, frame in (("train", train), ("eval", evaluation)):
        try:
            formatted_schema().validate(frame, lazy=True)
        except pa.errors.SchemaErrors as errors:
            first = errors.failure_cases.iloc[0]
            problems.append(
                f"{name}: {len(errors.failure_cases)} failure(s), first: check '{first['check']}' "
                f"on {first['column'] or 'the table'} at row {first['index']}"
            )
    examples = len(train) + len(evaluation)
    truncated = int(train["truncated"].sum() + evaluation["truncated"].sum())
    over_length = truncated + too_long_dropped
    rate = over_length / (examples + too_long_dropped) if examples else 0.0
    if rate > max_truncation_rate:
        problems.append(
            f"{rate:.1%} of examples are longer than training.max_length ({truncated} truncated, "
            f"{too_long_dropped} dropped), above dataset.max_truncation_rate={max_truncation_rate:.1%}; "
            "raise training.max_length or shorten the data"
        )
    eos = int((train["ends_with_eos"] | train["truncated"]).sum() + (evaluation["ends_with_eos"] | evaluation["truncated"]).sum())
    figures = {
        "examples": examples,
        "truncated": truncated,
        "too_long_dropped": too_long_dropped,
        "truncation_rate": rate,
        "max_truncation_rate": max_truncation_rate,
        "examples_ending_in_eos_or_truncated": eos,
    }
    if problems:
        return CheckOutcome(False, "; ".join(problems), figures)
    return CheckOutcome(True, f"{examples} examples: text, tokens, a trained token and EOS each; "
                              f"truncation {rate:.1%} within {max_truncation_rate:.1%}", figures)


def check_disjoint(train: pd.DataFrame, evaluation: pd.DataFrame) -> CheckOutcome:
    """No normalised content hash appears in both splits."""
    shared = np.intersect1d(train["content_hash"].to_numpy(), evaluation["content_hash"].to_numpy())
    figures = {"train_rows": len(train), "eval_rows": len(evaluation), "shared_examples": int(len(shared))}
    if len(shared):
        return CheckOutcome(False, f"{len(shared)} examples appear in both train and eval", figures)
    return CheckOutcome(True, f"train ({len(train)}) and eval ({len(evaluation)}) share no example", figures)
