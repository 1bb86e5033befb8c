"""Checks of the formatted dataset: every example trainable, EOS where it belongs, no leakage. Dagster-free."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass(frozen=True)
class CheckOutcome:
    """A check's verdict, a one-line description and figures for the UI."""

    passed: bool
    description: str
    figures: dict


SUMMARY_COLUMNS = ["text", "input_ids", "loss_mask", "truncated", "ends_with_eos"]


def split_summary(path) -> pd.DataFrame:
    """example_summary of a formatted split's Parquet file, read batch by batch (memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [example_summary(pa.Table.from_batches([batch]))
             for batch in pq.ParquetFile(path).iter_batches(batch_size=50_000, columns=SUMMARY_COLUMNS)]
    return pd.concat(parts, ignore_index=True) if parts else example_summary(pq.read_table(path, columns=SUMMARY_COLUMNS))


def example_summary(table: "pa.Table") -> pd.DataFrame:
    """Per example, the figures the checks need, computed column-wise from a formatted split (no row loop)."""
    import pyarrow.compute as pc

    ids, mask = table.column("input_ids").combine_chunks(), table.column("loss_mask").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    trained = np.zeros(len(lengths), dtype=np.int64)
    flat_mask = pc.list_flatten(mask).to_numpy(zero_copy_only=False).astype(np.int64)
    nonempty = lengths > 0
    if flat_mask.size:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        trained[nonempty] = np.add.reduceat(flat_mask, starts[nonempty])
    return pd.DataFrame(
        {
            "text_chars": pc.utf8_length(table.column("text")).to_numpy(zero_copy_only=False),
            "tokens": lengths,
            "trained_tokens": trained,
            "truncated": table.column("truncated").to_numpy(),
            "ends_with_eos": table.column("ends_with_eos").to_numpy(),
        }
    )


def formatted_schema():
    """pandera schema of a formatted split's summary: text, tokens, a trained token, EOS unless truncated."""
    import pandera.pandas as pa

    return pa.DataFrameSchema(
        {
            "text_chars": pa.Column(checks=pa.Check.ge(1, error="text is not empty")),
            "tokens": pa.Column(checks=pa.Check.ge(1, error="has tokens")),
            "trained_tokens": pa.Column(checks=pa.Check.ge(1, error="has at least one trained token")),
            "truncated": pa.Column(bool),
            "ends_with_eos": pa.Column(bool),
        },
        checks=[
            pa.Check(lambda frame: frame["ends_with_eos"] | frame["truncated"],
                     error="ends with exactly one EOS unless truncated"),
        ],
        name="formatted_split",
        strict=True,
    )


def check_formatted(
    train: pd.DataFrame, evaluation: pd.DataFrame, max_truncation_rate: float, too_long_dropped: int = 0
) -> CheckOutcome:
    """The pandera schema on both splits' example summaries, and the share of over-long examples (truncated or
    dropped) against the limit."""
    import pandera.pandas as pa

    problems = []
    summaries = {"train": train, "eval": evaluation}
    for name, summary in summaries.items():
        try:
            formatted_schema().validate(summary, lazy=True)
        except pa.errors.SchemaErrors as errors:
            first = errors.failure_cases.iloc[0]
            problems.append(
                f"{name}: {errors.failure_cases['index'].nunique()} example(s) fail, first at row {first['index']}: "
                f"{first['check']}"
            )
    examples = len(summaries["train"]) + len(summaries["eval"])
    truncated = int(summaries["train"]["truncated"].sum() + summaries["eval"]["truncated"].sum())
    over_length = truncated + too_long_dropped
    rate = over_length / (examples + too_long_dropped) if examples else 0.0
    if rate > max_truncation_rate:
        problems.append(
            f"{rate:.1%} of examples are longer than training.max_length ({truncated} truncated, "
            f"{too_long_dropped} dropped), above dataset.max_truncation_rate={max_truncation_rate:.1%}; "
            "raise training.max_length or shorten the data"
        )
    figures = {
        "examples": examples,
        "truncated": truncated,
        "too_long_dropped": too_long_dropped,
        "truncation_rate": rate,
        "max_truncation_rate": max_truncation_rate,
        "trained_tokens": int(summaries["train"]["trained_tokens"].sum() + summaries["eval"]["trained_tokens"].sum()),
    }
    if problems:
        return CheckOutcome(False, "; ".join(problems), figures)
    return CheckOutcome(True, f"{examples} examples: text, tokens, a trained token and EOS each; "
                              f"over-length {rate:.1%} within {max_truncation_rate:.1%}", figures)


def check_disjoint(train: pd.DataFrame, evaluation: pd.DataFrame) -> CheckOutcome:
    """No normalised content hash appears in both splits."""
    shared = np.intersect1d(train["content_hash"].to_numpy(), evaluation["content_hash"].to_numpy())
    figures = {"train_rows": len(train), "eval_rows": len(evaluation), "shared_examples": int(len(shared))}
    if len(shared):
        return CheckOutcome(False, f"{len(shared)} examples appear in both train and eval", figures)
    return CheckOutcome(True, f"train ({len(train)}) and eval ({len(evaluation)}) share no example", figures)
