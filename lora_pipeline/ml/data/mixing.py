"""Mixing a mixture's formatted sources: each source's training rows sampled or repeated by its weight, every
held-out row kept once, and the sources interleaved into one pair of splits with a `source` column. Dagster-free.

Which rows a weight keeps, and where each lands, is decided by a hash of the row's content and dataset.mix_seed
(splitmix64), never by its position or by the other sources: the same config and data give the same mixture,
and editing one source changes only that source's rows in it. The eval split's order does not depend on the
seed or the weights at all, so a new weight leaves the held-out examples (and the scores cached on them) alone.
mixture.py says what a mixture is and why it is formatted this way.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from lora_pipeline.errors import DataError, LoraPipelineError
from lora_pipeline.ml.data.clean import require_both_splits
from lora_pipeline.ml.data.formatted import (
    TOKENIZE_CHUNK_ROWS,
    FormattedDataset,
    format_dataset,
    overlong_policy,
    with_learned_parts,
)
from lora_pipeline.ml.data.mixture import SOURCE_COLUMN, SourceToFormat, named, prompt_format

if TYPE_CHECKING:
    import pyarrow as pa

_EVAL_ORDER = 0x5EED_E7A1  # the eval split's order depends on the rows alone, never on weights or the seed


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 values: a fixed, well-spread 64-bit hash, vectorised."""
    z = np.asarray(values, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _salted(hashes: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Per content hash, a draw that depends only on it, the seed and the salt."""
    key = _mix64(np.array([(seed * 0x9E3779B97F4A7C15 + salt) % 2**64], dtype=np.uint64))[0]
    return _mix64(np.asarray(hashes, dtype=np.uint64) ^ key)


def target_rows(rows: int, weight: float | None, train_rows: int | None) -> int:
    """How many training rows a source contributes: train_rows, else its rows times its weight (1 by default), rounded."""
    if train_rows is not None:
        return train_rows
    return int(np.floor(rows * (1.0 if weight is None else weight) + 0.5))


def mix_counts(row_hashes: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Per row, how many times it is trained on so that the rows add up to target: every row target // rows
    times, and the target % rows rows with the lowest seeded hash of their content once more (drawn without
    replacement, by content: the same rows in any order give the same draw)."""
    rows = len(row_hashes)
    full, rest = divmod(target, rows)
    counts = np.full(rows, full, dtype=np.int64)
    if rest:
        counts[np.argsort(_salted(row_hashes, seed, 0), kind="stable")[:rest]] += 1
    return counts


@dataclass
class _Split:
    """One source's examples of one split, grouped into rows (runs of one content hash)."""

    table: "pa.Table"
    starts: np.ndarray  # first example of each row
    lengths: np.ndarray  # examples per row
    hashes: np.ndarray  # uint64 per row
    tokens: np.ndarray  # tokens per row

    @classmethod
    def of(cls, table: "pa.Table | None") -> "_Split | None":
        if table is None or not len(table):
            return None
        hashes = table.column("content_hash").to_numpy().view(np.uint64)
        starts = np.flatnonzero(np.concatenate([[True], hashes[1:] != hashes[:-1]]))
        lengths = np.diff(np.append(starts, len(hashes)))
        tokens = np.add.reduceat(table.column("tokens").to_numpy().astype(np.int64), starts)
        return cls(table, starts, lengths, hashes[starts], tokens)


def format_mixture(sources: list[SourceToFormat], tokenizer, seed: int, progress: Callable[[str], None] | None = None,
                   folder: Path | None = None) -> FormattedDataset:
    """Format each source, then mix: training rows sampled or repeated by each source's weight (or train_rows),
    every held-out row once; both splits interleaved in a deterministic order, with a `source` column.

    With folder, each source is formatted into a scratch folder inside it (removed before returning) and the
    mixed splits are written to folder/train.parquet and folder/eval.parquet; without, all stays in memory.
    """
    import pyarrow.parquet as pq

    with (tempfile.TemporaryDirectory(dir=folder, prefix=".sources-") if folder else nullcontext(None)) as scratch:
        formatted, trains, evals = [], [], []
        for source in sources:
            out = Path(scratch) / source.name if scratch else None
            if out is not None:
                out.mkdir()
            if progress is not None:
                progress(f"formatting source {source.name} ({len(source.cleaned.frame):,} rows)")
            try:
                result = format_dataset(source.cleaned, tokenizer, source.settings, progress, out, check_splits=False)
            except LoraPipelineError as exc:
                raise named(source, exc) from None
            formatted.append(result)
            for split, tables in (("train", trains), ("eval", evals)):
                path = out / f"{split}.parquet" if out is not None else None
                table = (pq.read_table(path, memory_map=True) if path is not None and path.exists()
                         else getattr(result, split) if out is None else None)
                tables.append(_Split.of(table))
        counts_per_source = [_mixed_counts(source, split, seed) for source, split in zip(sources, trains)]
        return _write_mixture(sources, formatted, trains, evals, counts_per_source, tokenizer, seed, folder)


def _mixed_counts(source: SourceToFormat, train: "_Split | None", seed: int) -> np.ndarray:
    """Per training row of the source, its copies in the mixture; refused when the source gives none."""
    if train is None:
        raise DataError(f"{source.key} ({source.name}): no training rows left ({source.cleaned.counts['rows_in']:,} "
                        "read; every one held out, dropped in cleaning or over max_length); add rows or drop the source")
    target = target_rows(len(train.starts), source.weight, source.train_rows)
    if target < 1:
        raise DataError(f"{source.key} ({source.name}): weight {source.weight:g} of its {len(train.starts):,} "
                        "training rows is less than one row; raise the weight or set train_rows")
    return mix_counts(train.hashes, target, seed)


def _write_mixture(sources: list[SourceToFormat], formatted: list[FormattedDataset], trains: list[_Split],
                   evals: list["_Split | None"], counts_per_source: list[np.ndarray], tokenizer, seed: int,
                   folder: Path | None) -> FormattedDataset:
    """The mixed splits written (or kept), with the counts of all sources together and each one's figures."""
    import pyarrow as pa

    names = [source.name for source in sources]
    columns = _columns([split.table for split in trains + evals if split is not None])
    train_table = pa.concat_tables([_aligned(split.table, name, columns) for split, name in zip(trains, names)])
    eval_parts = [(split, name) for split, name in zip(evals, names) if split is not None]
    eval_table = (pa.concat_tables([_aligned(split.table, name, columns) for split, name in eval_parts])
                  if eval_parts else None)
    train_order = _order([(split, counts) for split, counts in zip(trains, counts_per_source)], seed, training=True)
    eval_order = _order([(split, np.ones(len(split.starts), dtype=np.int64)) for split, _ in eval_parts], seed,
                        training=False)
    sink_train = _write_split(train_table, train_order, folder, "train")
    sink_eval = _write_split(eval_table, eval_order, folder, "eval") if eval_table is not None else None
    figures = [_figures(source, result, train, evaluation, counts)
               for source, result, train, evaluation, counts in zip(sources, formatted, trains, evals, counts_per_source)]
    counts = {key: sum(result.counts[key] for result in formatted) for key in formatted[0].counts}
    counts["train_rows"] = sum(figure["train_examples_after"] for figure in figures)
    counts["train_tokens"] = sum(figure["train_tokens_after"] for figure in figures)
    total_tokens = max(counts["train_tokens"], 1)
    for figure in figures:
        figure["train_token_share"] = round(figure["train_tokens_after"] / total_tokens, 4)
    require_both_splits(counts["train_rows"], counts["eval_rows"], sources[0].settings.eval_fraction,
                        "dataset.sources")
    lengths = [result.token_lengths for result in formatted]
    max_length = sources[0].settings.max_length
    over = sum(int((length > max_length).sum()) for length, result in zip(lengths, formatted) if result.overlong != "split")
    policies = {result.overlong for result in formatted}
    prompted = [result for result in formatted if result.format != "text"] or formatted
    preview = train_table.take(pa.array(train_order[:5])).select(
        ["prompt", "completion", "tokens", "input_ids", "loss_mask", SOURCE_COLUMN]).to_pandas()
    return FormattedDataset(
        template=prompted[0].template,
        format=prompt_format([result.format for result in formatted]),
        overlong=policies.pop() if len(policies) == 1 else ", ".join(
            f"{name}: {result.overlong}" for name, result in zip(names, formatted)),
        counts=counts,
        token_lengths=np.concatenate(lengths),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        preview=with_learned_parts(preview, tokenizer),
        train=sink_train,
        eval=sink_eval,
        sources=figures,
        truncation_rate=over / max(sum(len(length) for length in lengths), 1),
    )


def _columns(tables: list["pa.Table"]) -> list[str]:
    """The mixed splits' columns: every source's, `continued` where any source split documents, then `source`."""
    names = list(tables[0].column_names)
    if any("continued" in table.column_names for table in tables) and "continued" not in names:
        names.insert(names.index("split_bucket") + 1, "continued")
    return names + [SOURCE_COLUMN]


def _aligned(table: "pa.Table", name: str, columns: list[str]) -> "pa.Table":
    import pyarrow as pa

    if "continued" in columns and "continued" not in table.column_names:
        table = table.append_column("continued", pa.array(np.zeros(len(table), dtype=bool)))
    table = table.append_column(SOURCE_COLUMN, pa.array([name] * len(table), pa.string()))
    return table.select(columns)


def _order(parts: list[tuple["_Split | None", np.ndarray]], seed: int, training: bool) -> np.ndarray:
    """The examples of the concatenated sources in mixed order: each row's copies placed by a hash of its content
    (and, for training, the seed and the copy's number), a row's examples kept together and in order."""
    starts, lengths, hashes, copy = [], [], [], []
    offset = 0
    for split, counts in parts:
        if split is None:
            continue
        starts.append(np.repeat(split.starts + offset, counts))
        lengths.append(np.repeat(split.lengths, counts))
        hashes.append(np.repeat(split.hashes, counts))
        first = np.repeat(np.cumsum(counts) - counts, counts)
        copy.append(np.arange(int(counts.sum())) - first)
        offset += len(split.table)
    starts, lengths, hashes, copy = (np.concatenate(values) for values in (starts, lengths, hashes, copy))
    if training:
        keys = np.empty(len(hashes), dtype=np.uint64)
        for number in np.unique(copy):
            chosen = copy == number
            keys[chosen] = _salted(hashes[chosen], seed, 1 + int(number))
    else:
        keys = _salted(hashes, _EVAL_ORDER, 0)
    placed = np.lexsort((np.arange(len(keys)), keys))
    starts, lengths = starts[placed], lengths[placed]
    shift = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return shift + np.arange(int(lengths.sum()))


def _write_split(table: "pa.Table", order: np.ndarray, folder: Path | None, split: str) -> "pa.Table | None":
    """The split's examples in order, to folder/<split>.parquet in row groups of TOKENIZE_CHUNK_ROWS (as formatting
    writes them), or as a table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if folder is None:
        return table.take(pa.array(order))
    with pq.ParquetWriter(str(folder / f"{split}.parquet"), table.schema) as writer:
        for start in range(0, len(order), TOKENIZE_CHUNK_ROWS):
            writer.write_table(table.take(pa.array(order[start:start + TOKENIZE_CHUNK_ROWS])))
    return None


def _figures(source: SourceToFormat, result: FormattedDataset, train: _Split, evaluation: "_Split | None",
             counts: np.ndarray) -> dict:
    """One source's rows and tokens before and after mixing, for the metadata and format_summary.json."""
    return {
        "name": source.name,
        "source": source.cleaned.loaded.source,
        "format": result.format,
        "template": result.template,
        "share": f"{source.train_rows} rows" if source.train_rows is not None else f"weight {source.weight or 1:g}",
        "rows_read": result.counts["rows_in"],
        "rows_after_cleaning": result.counts["rows_after_cleaning"],
        "train_rows_before": len(train.starts),
        "train_rows_after": int(counts.sum()),
        "train_examples_before": int(train.lengths.sum()),
        "train_examples_after": int((train.lengths * counts).sum()),
        "train_tokens_before": int(train.tokens.sum()),
        "train_tokens_after": int((train.tokens * counts).sum()),
        "eval_rows": 0 if evaluation is None else len(evaluation.starts),
        "eval_examples": 0 if evaluation is None else int(evaluation.lengths.sum()),
        "overlong": overlong_policy(source.settings.overlong, result.format),
    }
