"""Cleaning: empty rows and duplicates dropped (exact and case/whitespace-normalised), content hashes
for the train/eval split, and the split sizes. Dagster-free."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.formats import REASONING, conversations_of
from lora_pipeline.ml.data.raw import LoadedDataset
from lora_pipeline.ml.data.sources import SourceRows
from lora_pipeline.ml.data.templates import alpaca_prompt

if TYPE_CHECKING:
    import pyarrow as pa

SPLIT_BUCKETS = 10_000
TOKENIZER_CORPUS_ROWS = 50_000
HASH_CHUNK_ROWS = 100_000


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def text_column(frame: pd.DataFrame, column: str) -> "pa.Array":
    """A text column as an Arrow string array, missing values as ''."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in frame.columns:
        return pa.array([""] * len(frame), pa.string())
    values = frame[column]
    array = pa.array(values.where(values.map(lambda v: isinstance(v, str)), "") if values.dtype == object else values,
                     pa.string(), from_pandas=True)
    return pc.fill_null(array, "")


def content_parts(loaded: LoadedDataset, chats: list[list[dict]] | None = None) -> list["pa.Array"]:
    """What makes two rows the same example, as string columns: the texts the model sees, in order.

    chats: the rows as conversations_of gives them, for conversational formats (parsed once by the caller).
    """
    import pyarrow as pa

    frame, fmt = loaded.frame, loaded.format
    if fmt == "alpaca":
        return [text_column(frame, "instruction"), text_column(frame, "input"), text_column(frame, "output"),
                text_column(frame, "system")]
    if fmt == "prompt_completion":
        return [text_column(frame, "prompt"), text_column(frame, "completion"), text_column(frame, "system")]
    if fmt == "text":
        return [text_column(frame, "text")]
    return [pa.array(
        # Reasoning joins the key only where a turn has some, so rows without any keep their hashes.
        ["\x1d".join(f"{m['role']}\x1e{m['content']}\x1e{m.get('tool_calls', '')}"
                      + (f"\x1e{m[REASONING]}" if m.get(REASONING) else "") for m in chat)
         for chat in (chats if chats is not None else conversations_of(frame, fmt, None))],
        pa.string(),
    )]


def normalise(part: "pa.Array") -> "pa.Array":
    """Case- and whitespace-insensitive form of texts: Python's ' '.join(text.split()).lower(), vectorised.

    Most texts are printable ASCII with single spaces between words and none at the ends, which
    splitting and joining leaves as they are; only the others pay for the split (the costly part).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(part, pa.ChunkedArray):  # as read from a large Parquet file
        return pa.chunked_array([normalise(chunk) for chunk in part.chunks], pa.string())
    irregular = pc.match_substring_regex(part, r"[^\x20-\x7e]|  |^ | $")
    # Not ascii_lower, though these texts are ASCII: in pyarrow 26 it mangles arrays whose offsets do
    # not start at 0, as the chunks of a large Parquet column do.
    lowered = pc.utf8_lower(part)
    if not pc.any(irregular).as_py():
        return lowered
    rest = part.filter(irregular)
    return pc.replace_with_mask(lowered, irregular, pc.utf8_lower(pc.utf8_trim(pc.binary_join(
        pc.utf8_split_whitespace(rest), " "), " ")))


def _joined(parts: list["pa.Array"]) -> "pa.Array":
    """Parts joined with a unit separator; a trailing optional part (a system prompt) only where it is set."""
    import pyarrow.compute as pc

    *required, optional = parts if len(parts) > 1 else (parts + [None])
    joined = pc.binary_join_element_wise(*required, "\x1f") if len(required) > 1 else required[0]
    if optional is None:
        return joined
    return pc.if_else(pc.equal(optional, ""), joined, pc.binary_join_element_wise(joined, optional, "\x1f"))


def _hash64(keys: "pa.Array") -> np.ndarray:
    """Per text, the first 8 bytes of the sha256 of its UTF-8 as a big-endian integer.

    Hashed straight from the Arrow buffers, which hold exactly that UTF-8: no Python string per row.
    """
    import pyarrow as pa

    if isinstance(keys, pa.ChunkedArray):
        return np.concatenate([np.zeros(0, dtype=np.uint64)] + [_hash64(chunk) for chunk in keys.chunks])
    if not len(keys):
        return np.zeros(0, dtype=np.uint64)
    keys = keys.cast(pa.string())
    # Offsets index the data buffer directly (they need not start at 0): slice by them, as they are.
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32)[keys.offset : keys.offset + len(keys) + 1].tolist()
    utf8 = memoryview(keys.buffers()[2] or b"")
    sha256 = hashlib.sha256
    digests = b"".join([sha256(utf8[start:end]).digest()[:8] for start, end in zip(offsets, offsets[1:])])
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def content_hashes(parts: list["pa.Array"]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, 64-bit sha256 hashes of its exact and of its normalised content (stable across runs and machines).

    Chunked, so the intermediate strings stay small, and the Arrow string work of the next chunk
    runs in a thread (it releases the GIL) while this one is hashed.
    """
    from concurrent.futures import ThreadPoolExecutor

    total = len(parts[0])

    def keys(start: int) -> tuple["pa.Array", "pa.Array"]:
        chunk = [part.slice(start, HASH_CHUNK_ROWS) for part in parts]
        return _joined(chunk), _joined([normalise(part) for part in chunk])

    exact, normalised = [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        starts = list(range(0, total, HASH_CHUNK_ROWS))
        pending = pool.submit(keys, starts[0]) if starts else None
        for index in range(len(starts)):
            exact_keys, normalised_keys = pending.result()
            pending = pool.submit(keys, starts[index + 1]) if index + 1 < len(starts) else None
            exact.append(_hash64(exact_keys))
            normalised.append(_hash64(normalised_keys))
    if not exact:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
    return np.concatenate(exact), np.concatenate(normalised)


def _is_empty(loaded: LoadedDataset, chats: list[list[dict]] | None = None) -> np.ndarray:
    import pyarrow.compute as pc

    frame, fmt = loaded.frame, loaded.format

    def blank(column: str) -> np.ndarray:
        return pc.equal(pc.utf8_trim_whitespace(text_column(frame, column)), "").to_numpy(zero_copy_only=False)

    if fmt == "alpaca":
        return blank("instruction") | blank("output")
    if fmt == "prompt_completion":
        return blank("completion")
    if fmt == "text":
        return blank("text")
    return np.array(
        [not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in chat)
         for chat in (chats if chats is not None else conversations_of(frame, fmt, None))],
        dtype=bool,
    )


@dataclass
class CleanedRows:
    """The rows that survive cleaning, their content hashes, and how many each step removed."""

    loaded: LoadedDataset
    hashes: np.ndarray  # uint64 per surviving row
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def frame(self) -> pd.DataFrame:
        return self.loaded.frame

    def held_out(self, eval_fraction: float) -> np.ndarray:
        """Per row, whether it lands in the held-out split."""
        return (self.hashes % SPLIT_BUCKETS) < round(eval_fraction * SPLIT_BUCKETS)


def clean_rows(loaded: LoadedDataset, dedupe: str = "normalized") -> CleanedRows:
    """Drop empty rows and duplicates (exact, then case/whitespace-normalised), counting each step."""
    counts = {"rows_in": len(loaded.frame)}
    chats = conversations_of(loaded.frame, loaded.format, None) if loaded.format in ("sharegpt", "messages") else None
    keep = ~_is_empty(loaded, chats)
    counts["empty"] = int((~keep).sum())
    # Duplicates are found by 64-bit content hash: a chance collision among a million rows is ~3e-8.
    exact_hashes, hashes = content_hashes(content_parts(loaded, chats))
    exact_duplicate = pd.Series(exact_hashes).duplicated().to_numpy() & keep
    if dedupe != "none":
        keep &= ~exact_duplicate
    counts["exact_duplicates"] = int(exact_duplicate.sum()) if dedupe != "none" else 0
    normalised_duplicate = np.zeros(len(hashes), dtype=bool)
    if dedupe == "normalized":
        surviving = np.flatnonzero(keep)
        normalised_duplicate[surviving] = pd.Series(hashes[surviving]).duplicated().to_numpy()
        keep &= ~normalised_duplicate
    counts["normalized_duplicates"] = int(normalised_duplicate.sum())
    kept = LoadedDataset(
        rows=SourceRows(loaded.frame if keep.all() else loaded.frame[keep].reset_index(drop=True), loaded.source,
                        loaded.rows.kind, []),
        format=loaded.format,
        detected=loaded.detected,
    )
    original_rows = np.flatnonzero(keep)
    kept.rows.where = lambda row: loaded.rows.where(int(original_rows[row]))  # type: ignore[method-assign]
    counts["rows_after_cleaning"] = len(kept.frame)
    if not len(kept.frame):
        raise DataError(
            f"{loaded.source}: cleaning removed every row ({counts['empty']} empty, "
            f"{counts['exact_duplicates']} exact and {counts['normalized_duplicates']} normalised duplicates "
            f"of {counts['rows_in']})"
        )
    return CleanedRows(loaded=kept, hashes=hashes[keep], counts=counts)


def require_both_splits(train_rows: int, eval_rows: int, eval_fraction: float, source: str) -> None:
    """Refuse a split that leaves either side empty."""
    if not train_rows or not eval_rows:
        raise DataError(
            f"{source}: {train_rows + eval_rows} rows give {train_rows} training and {eval_rows} held-out "
            f"examples at eval_fraction={eval_fraction}; both need at least one (add rows or change "
            "dataset.eval_fraction)"
        )


def split_sizes(cleaned: CleanedRows, eval_fraction: float) -> tuple[int, int]:
    """(training, held-out) row counts before the token-length policy, checked like format_dataset checks them."""
    held_out = int(cleaned.held_out(eval_fraction).sum())
    train = len(cleaned.hashes) - held_out
    require_both_splits(train, held_out, eval_fraction, cleaned.loaded.source)
    return train, held_out


def tokenizer_corpus(cleaned: CleanedRows, eval_fraction: float) -> list[str]:
    """Texts of the training rows (at most TOKENIZER_CORPUS_ROWS), untemplated: what a built-in tokenizer learns from."""
    frame, fmt = cleaned.frame, cleaned.loaded.format
    train_rows = np.flatnonzero(~cleaned.held_out(eval_fraction))[:TOKENIZER_CORPUS_ROWS]
    part = frame.iloc[train_rows]
    if fmt == "alpaca":
        inputs = part["input"] if "input" in part.columns else [""] * len(part)
        return [alpaca_prompt(_text(i), _text(x)) + _text(o)
                for i, x, o in zip(part["instruction"], inputs, part["output"])]
    if fmt == "prompt_completion":
        return [_text(p) + _text(c) for p, c in zip(part["prompt"], part["completion"])]
    if fmt == "text":
        return [_text(t) for t in part["text"]]
    # As ChatML lays them out (what `auto` renders conversations in on a built-in base, which has no
    # chat template of its own), so the tokenizer learns the markup too rather than spelling it out.
    return ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
            for chat in conversations_of(part, fmt, None)]


# --- rendering, tokenizing, the over-long policy and the split ------------------------------------
