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


@dataclass(frozen=True)
class LengthAdvice:
    """What training.max_length keeps, from every example's untruncated token length: what the current
    setting loses, and the settings that would keep 95% and 99% of the examples whole."""

    max_length: int
    examples: int
    longer: int  # examples over max_length
    tokens: int
    tokens_beyond: int  # their tokens past max_length
    keeps_95: int
    keeps_99: int

    @classmethod
    def of(cls, lengths: np.ndarray, max_length: int) -> "LengthAdvice":
        lengths = np.asarray(lengths, dtype=np.int64)
        longer = lengths > max_length

        def keeping(share: float) -> int:  # the smallest length at least `share` of the examples fit in
            return int(np.quantile(lengths, share, method="inverted_cdf")) if len(lengths) else 0

        return cls(max_length=max_length, examples=len(lengths), longer=int(longer.sum()), tokens=int(lengths.sum()),
                   tokens_beyond=int((lengths[longer] - max_length).sum()), keeps_95=keeping(0.95),
                   keeps_99=keeping(0.99))

    def suggestion(self) -> str:
        """The max_length that would keep 95% and 99% of the examples whole, in words."""
        return (f"training.max_length={self.keeps_95} keeps 95% of the examples whole, "
                f"{self.keeps_99} keeps 99%")


def split_summary(path) -> pd.DataFrame:
    """example_summary of a formatted split's Parquet file, read batch by batch (memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    columns = SUMMARY_COLUMNS + (["continued"] if "continued" in file.schema_arrow.names else [])
    parts = [example_summary(pa.Table.from_batches([batch]))
             for batch in file.iter_batches(batch_size=50_000, columns=columns)]
    return pd.concat(parts, ignore_index=True) if parts else example_summary(pq.read_table(path, columns=columns))


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
            # A block of a split document that goes on in the next block ends without EOS by design.
            "continued": (table.column("continued").to_numpy() if "continued" in table.column_names
                          else np.zeros(len(lengths), dtype=bool)),
        }
    )


def formatted_schema():
    """pandera schema of a formatted split's summary: text, tokens, a trained token, EOS unless truncated or
    continued in the next block."""
    import pandera.pandas as pa

    return pa.DataFrameSchema(
        {
            "text_chars": pa.Column(checks=pa.Check.ge(1, error="text is not empty")),
            "tokens": pa.Column(checks=pa.Check.ge(1, error="has tokens")),
            "trained_tokens": pa.Column(checks=pa.Check.ge(1, error="has at least one trained token")),
            "truncated": pa.Column(bool),
            "ends_with_eos": pa.Column(bool),
            "continued": pa.Column(bool),
        },
        checks=[
            pa.Check(lambda frame: frame["ends_with_eos"] | frame["truncated"] | frame["continued"],
                     error="ends with exactly one EOS unless truncated or continued in the next block"),
        ],
        name="formatted_split",
        strict=True,
    )


def check_formatted(
    train: pd.DataFrame, evaluation: pd.DataFrame, max_truncation_rate: float, too_long_dropped: int = 0,
    advice: LengthAdvice | None = None, tokens_lost: int | None = None,
) -> CheckOutcome:
    """The pandera schema on both splits' example summaries, and the share of over-long examples (truncated or
    dropped; a split document loses nothing) against the limit. A failure says what max_length would fit."""
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
    rate = over_length_rate(truncated, too_long_dropped, examples)
    if rate > max_truncation_rate:
        problems.append(over_length_problem(rate, max_truncation_rate, truncated, too_long_dropped, tokens_lost, advice))
    figures = {
        "examples": examples,
        "truncated": truncated,
        "too_long_dropped": too_long_dropped,
        "truncation_rate": rate,
        "max_truncation_rate": max_truncation_rate,
        **({} if tokens_lost is None else {"tokens_lost": tokens_lost}),
        **({} if advice is None else {"max_length_keeping_95%": advice.keeps_95, "max_length_keeping_99%": advice.keeps_99}),
        "trained_tokens": int(summaries["train"]["trained_tokens"].sum() + summaries["eval"]["trained_tokens"].sum()),
    }
    if problems:
        return CheckOutcome(False, "; ".join(problems), figures)
    return CheckOutcome(True, f"{examples} examples: text, tokens, a trained token and EOS each; "
                              f"over-length {rate:.1%} within {max_truncation_rate:.1%}", figures)


def over_length_rate(truncated: int, dropped: int, examples: int) -> float:
    """The share of examples over max_length (truncated, or dropped for it) among those kept or dropped for it."""
    return (truncated + dropped) / (examples + dropped) if examples + dropped else 0.0


def over_length_problem(rate: float, max_rate: float, truncated: int, dropped: int, tokens_lost: int | None,
                        advice: LengthAdvice | None) -> str:
    """Why too many examples are over max_length, what that loses, and the max_length that would fit."""
    lost = "" if tokens_lost is None else f": {tokens_lost:,} tokens lost"
    setting = f"training.max_length={advice.max_length}" if advice else "training.max_length"
    fix = f"{advice.suggestion()}; raise it" if advice else "raise training.max_length"
    return (f"{rate:.1%} of examples are longer than {setting} ({truncated} truncated, {dropped} "
            f"dropped{lost}), above dataset.max_truncation_rate={max_rate:.1%}; {fix} or shorten the data")


def check_disjoint(train: pd.DataFrame, evaluation: pd.DataFrame) -> CheckOutcome:
    """No normalised content hash appears in both splits."""
    shared = np.intersect1d(train["content_hash"].to_numpy(), evaluation["content_hash"].to_numpy())
    figures = {"train_rows": len(train), "eval_rows": len(evaluation), "shared_examples": int(len(shared))}
    if len(shared):
        return CheckOutcome(False, f"{len(shared)} examples appear in both train and eval", figures)
    return CheckOutcome(True, f"train ({len(train)}) and eval ({len(evaluation)}) share no example", figures)
