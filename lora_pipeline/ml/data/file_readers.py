"""Reading one dataset file by its kind (JSON, JSON Lines, CSV, Parquet, text), locally or through fsspec.

Dagster-free. Each reader returns the rows as a pandas table and, for line-based files, each row's
line number, so a bad value can be named by file and line. Bytes that are not UTF-8 are refused
with the line they are on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd

from lora_pipeline.errors import DataError


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise DataError(f"{path}: dataset not found") from None
        except Exception as exc:
            raise DataError(f"{path}: cannot read: {exc}") from None
    return Path(path).read_bytes()


def _decode(payload: bytes, path: str) -> str:
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _raise_not_utf8(payload, exc.start, path)


def _check_utf8(payload: bytes, path: str, block: int = 16 << 20) -> None:
    """Refuse bytes that are not UTF-8, decoding block by block so no second copy of a big file is held."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(payload)
    for start in range(0, len(payload), block):
        try:
            decoder.decode(view[start : start + block], final=start + block >= len(payload))
        except UnicodeDecodeError as exc:
            _raise_not_utf8(payload, max(start + exc.start, 0), path)
    if not payload:
        decoder.decode(b"", final=True)


def _raise_not_utf8(payload: bytes, position: int, path: str):
    line = payload[:position].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: bytes that are not UTF-8 (at byte {position})") from None


def _records_frame(records: list, path: str, numbering: str, lines: list[int] | None = None) -> pd.DataFrame:
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            place = f"line {lines[index]}" if lines else f"{numbering} {index}"
            raise DataError(f"{path}: {place}: expected an object, found {type(record).__name__}")
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _read_json(path: str) -> tuple[pd.DataFrame, None]:
    text = _decode(_read_bytes(path), path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    if not text.lstrip().startswith("["):
        return _read_jsonl_text(text, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}") from None
    return _records_frame(records, path, "row"), None


def _read_jsonl(path: str) -> tuple[pd.DataFrame, tuple[int, ...] | None]:
    payload = _read_bytes(path)
    fast = _read_jsonl_arrow(payload)
    if fast is not None:
        _check_utf8(payload, path)  # Arrow's reader does not reject bytes that are not UTF-8
        return fast, None
    # The slow path parses line by line, so that an error names the exact line and reason.
    text = _decode(payload, path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    return _read_jsonl_text(text, path)


def _read_jsonl_arrow(payload: bytes) -> pd.DataFrame | None:
    """Arrow's multi-threaded JSON Lines reader for flat rows where row N is line N+1; None when it does not apply."""
    import io

    import pyarrow as pa
    import pyarrow.json as pj

    body = payload.rstrip(b"\n")
    if not body.strip() or b"\n\n" in body or body.startswith(b"\n") or b"\r" in body:
        return None
    try:
        table = pj.read_json(io.BytesIO(payload), read_options=pj.ReadOptions(block_size=32 << 20))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    # Nested values go through Python's json instead, so each row keeps exactly the keys it has
    # (Arrow would give every object the union of all rows' keys).
    if any(pa.types.is_nested(field.type) for field in table.schema):
        return None
    return table.to_pandas()


def _read_jsonl_text(text: str, path: str) -> tuple[pd.DataFrame, tuple[int, ...]]:
    records, lines = [], []
    decode = json.JSONDecoder().decode
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(decode(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}, column {exc.colno}: invalid JSON: {exc.msg}") from None
        lines.append(number)
    return _records_frame(records, path, "line", lines), tuple(lines)


def _read_csv(path: str) -> tuple[pd.DataFrame, None]:
    import io

    text = _decode(_read_bytes(path), path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: invalid CSV: {str(exc).strip()}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the dataset file is empty") from None
    return frame, None


def _read_parquet(path: str) -> tuple[pd.DataFrame, None]:
    import io

    import pyarrow.parquet as pq

    payload = _read_bytes(path)
    try:
        table = pq.read_table(io.BytesIO(payload))
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError variants
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    return plain_objects(table.to_pandas()), None


def plain_objects(frame: pd.DataFrame) -> pd.DataFrame:
    """Nested Parquet values as Python lists/dicts (pyarrow gives numpy arrays for lists)."""
    import numpy as np

    def plain(value):
        if isinstance(value, np.ndarray):
            return [plain(v) for v in value.tolist()]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    for column in frame.columns:
        if frame[column].dtype == object and len(frame) and not isinstance(frame[column].iloc[0], str):
            frame[column] = frame[column].map(plain)
    return frame


def _read_txt(path: str) -> tuple[pd.DataFrame, tuple[int, ...]]:
    text = _decode(_read_bytes(path), path)
    if not text.strip():
        raise DataError(f"{path}: the dataset file is empty")
    texts, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            texts.append(line)
            lines.append(number)
    return pd.DataFrame({"text": texts}), tuple(lines)


READERS: dict[str, Callable[[str], tuple[pd.DataFrame, tuple[int, ...] | None]]] = {
    "json": _read_json,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "txt": _read_txt,
}
