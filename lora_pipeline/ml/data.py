"""Reading, checking, templating and splitting instruction data. Dagster-free."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_pipeline.errors import DataError

ALPACA_FIELDS = ("instruction", "input", "output")
ALPACA_REQUIRED = ("instruction", "output")
SPLIT_BUCKETS = 10_000


def _open_text(source: str) -> str:
    """Read a local path or an fsspec URL as UTF-8 text."""
    if "://" in source:
        import fsspec

        try:
            with fsspec.open(source, "rb") as handle:
                payload = handle.read()
        except FileNotFoundError:
            raise DataError(f"{source}: dataset not found") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: dataset file not found (relative paths are resolved against {Path.cwd()})")
        payload = path.read_bytes()
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = payload[: exc.start].count(b"\n") + 1
        raise DataError(f"{source}: line {line}: bytes that are not UTF-8 (at byte {exc.start})") from None


def read_records(source: str) -> list[dict]:
    """Rows of a JSON array file or a JSON Lines file, as dicts."""
    text = _open_text(source)
    if not text.strip():
        raise DataError(f"{source}: the dataset file is empty")
    if source.endswith(".jsonl") or not text.lstrip().startswith("["):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: line {number}: invalid JSON: {exc.msg}") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {index}: expected an object, found {type(row).__name__}")
    return rows


def check_alpaca(rows: list[dict], source: str) -> pd.DataFrame:
    """The rows as an instruction/input/output table; errors name the row and the field."""
    if not rows:
        raise DataError(f"{source}: the dataset has no rows")
    found = sorted({key for row in rows[:100] for key in row})
    for index, row in enumerate(rows):
        for field in ALPACA_REQUIRED:
            if field not in row:
                raise DataError(
                    f"{source}: row {index}: missing field '{field}' (alpaca rows need instruction and "
                    f"output, optionally input; found {', '.join(found)})"
                )
        for field in ALPACA_FIELDS:
            value = row.get(field, "")
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"{source}: row {index}: field '{field}' must be a string, found {type(value).__name__}"
                )
    return pd.DataFrame(
        {field: [row.get(field) or "" for row in rows] for field in ALPACA_FIELDS},
        dtype="string",
    )


def load_alpaca(source: str, max_rows: int | None = None) -> pd.DataFrame:
    """Read and check an Alpaca-format dataset."""
    rows = read_records(source)
    if max_rows is not None:
        rows = rows[:max_rows]
    return check_alpaca(rows, source)


def fingerprint(frame: pd.DataFrame) -> str:
    """Content hash of a table: equal rows in equal order give an equal fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(frame.columns)).encode())
    for values in frame.itertuples(index=False):
        digest.update(json.dumps([str(v) for v in values], ensure_ascii=False).encode())
    return digest.hexdigest()


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Alpaca prompt, ending where the response begins."""
    if input_text.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _with_single_eos(text: str, eos_token: str) -> str:
    stripped = text.rstrip()
    while stripped.endswith(eos_token):
        stripped = stripped[: -len(eos_token)].rstrip()
    return stripped + eos_token


def split_bucket(instruction: str, input_text: str, output: str) -> int:
    """Stable bucket in [0, SPLIT_BUCKETS) from the row's normalised content."""
    normalised = "\x1f".join(" ".join(part.split()).lower() for part in (instruction, input_text, output))
    return int.from_bytes(hashlib.sha256(normalised.encode()).digest()[:8], "big") % SPLIT_BUCKETS


def is_eval_row(bucket: int, eval_fraction: float) -> bool:
    """Whether a row's bucket falls in the held-out share."""
    return bucket < round(eval_fraction * SPLIT_BUCKETS)


def split_buckets(frame: pd.DataFrame) -> list[int]:
    """The split bucket of every row of an instruction/input/output table."""
    return [split_bucket(i, x, o) for i, x, o in zip(frame["instruction"], frame["input"], frame["output"])]


def held_out_mask(frame: pd.DataFrame, eval_fraction: float) -> list[bool]:
    """For every row, whether it lands in the held-out split."""
    return [is_eval_row(bucket, eval_fraction) for bucket in split_buckets(frame)]


@dataclass(frozen=True)
class FormattedSplits:
    """Training and held-out examples with prompt, completion (response + EOS) and full text."""

    train: pd.DataFrame
    eval: pd.DataFrame
    template: str


def format_alpaca(frame: pd.DataFrame, eos_token: str, eval_fraction: float, source: str) -> FormattedSplits:
    """Apply the Alpaca template, end each example with exactly one EOS and split train/eval by content."""
    prompts = [alpaca_prompt(i, x) for i, x in zip(frame["instruction"], frame["input"])]
    completions = [_with_single_eos(o, eos_token) for o in frame["output"]]
    buckets = split_buckets(frame)
    formatted = pd.DataFrame(
        {
            "prompt": prompts,
            "completion": completions,
            "text": [p + c for p, c in zip(prompts, completions)],
            "split_bucket": buckets,
        }
    )
    held_out = formatted["split_bucket"].map(lambda b: is_eval_row(b, eval_fraction))
    train = formatted[~held_out].reset_index(drop=True)
    evaluation = formatted[held_out].reset_index(drop=True)
    _require_both_splits(len(train), len(evaluation), eval_fraction, source)
    return FormattedSplits(train=train, eval=evaluation, template="alpaca")


def split_sizes(frame: pd.DataFrame, eval_fraction: float, source: str) -> tuple[int, int]:
    """(training, held-out) row counts the split will give, checked like format_alpaca checks them."""
    held_out = sum(held_out_mask(frame, eval_fraction))
    _require_both_splits(len(frame) - held_out, held_out, eval_fraction, source)
    return len(frame) - held_out, held_out


def _require_both_splits(train_rows: int, eval_rows: int, eval_fraction: float, source: str) -> None:
    if not train_rows or not eval_rows:
        raise DataError(
            f"{source}: {train_rows + eval_rows} rows give {train_rows} training and {eval_rows} held-out "
            f"examples at eval_fraction={eval_fraction}; both need at least one (add rows or change "
            "dataset.eval_fraction)"
        )


def training_texts(frame: pd.DataFrame, eval_fraction: float) -> list[str]:
    """The texts of the rows that land in the training split, without templating (tokenizer corpus)."""
    return [
        alpaca_prompt(instruction, input_text) + output
        for instruction, input_text, output, held_out in zip(
            frame["instruction"], frame["input"], frame["output"], held_out_mask(frame, eval_fraction)
        )
        if not held_out
    ]
