"""From a dataset source to tokenized, cleaned, split training examples. Dagster-free.

The stages: read the source and check it against its format (``load_dataset``); drop empty rows and
duplicates (``clean_rows``); render each row with its template, tokenize in batches, apply the
over-long policy and split train/eval by a hash of the normalised content (``format_dataset``).
Every count is kept, so the metadata can say where each row went.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.formats import (
    conversations_of,
    detect_format,
    tools_of,
    validate_rows,
    with_format_columns,
)
from lora_pipeline.ml.data.sources import SourceRequest, SourceRows, read_source, source_version
from lora_pipeline.ml.data.templates import Rendered, alpaca_prompt, render_chats, render_single_turn, resolve_template

if TYPE_CHECKING:
    import pyarrow as pa

SPLIT_BUCKETS = 10_000
TOKENIZE_CHUNK_ROWS = 20_000
TOKENIZER_CORPUS_ROWS = 50_000
HASH_CHUNK_ROWS = 100_000
ProgressFn = Callable[[str], None]


@dataclass
class LoadedDataset:
    """Rows read from the source and checked against their format."""

    rows: SourceRows
    format: str
    detected: bool

    @property
    def frame(self) -> pd.DataFrame:
        return self.rows.frame

    @property
    def source(self) -> str:
        return self.rows.source


def source_request(settings) -> SourceRequest:
    """What the dataset section asks to read."""
    return SourceRequest(
        source=settings.source,
        split=settings.split,
        subset=settings.subset,
        revision=settings.revision,
        columns=dict(settings.columns),
        max_rows=settings.max_rows,
    )


def dataset_source_version(settings) -> str:
    """The content version of the dataset section's source (changes when its data can have changed)."""
    return source_version(source_request(settings))


def load_dataset(settings) -> LoadedDataset:
    """Read dataset.source and check every row against dataset.format ('auto' detects it)."""
    rows = read_source(source_request(settings))
    detected = settings.format == "auto"
    fmt = detect_format(rows.frame, rows.source) if detected else settings.format
    rows.frame = with_format_columns(rows.frame, fmt)
    validate_rows(rows.frame, fmt, rows.where, rows.source)
    return LoadedDataset(rows=rows, format=fmt, detected=detected)


def release_unused_memory() -> None:
    """Hand freed Python and Arrow memory back to the OS, so the next stage in this process starts low.

    Arrow's allocator keeps freed blocks for reuse; without this the peaks of successive stages of
    one run add up (measured at a million rows: 2.1 GB and 1.7 GB alone, 3.8 GB in one process).
    """
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()


def fingerprint(stored: pd.DataFrame) -> str:
    """Content hash of a table as storable() returns it: equal rows in equal order give an equal fingerprint."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, stored.columns)).encode())
    for column in stored.columns:
        values = stored[column]
        if values.dtype == object:
            values = values.map(lambda v: None if v is None or v != v else str(v))
        array = pc.fill_null(pa.array(values, pa.string(), from_pandas=True), "\x00")
        for start in range(0, len(array), 100_000):
            digest.update("\x1e".join(array.slice(start, 100_000).to_pylist()).encode())
    return digest.hexdigest()


# --- content keys, cleaning and the split ---------------------------------------------------------

def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _strings(frame: pd.DataFrame, column: str) -> "pa.Array":
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
        return [_strings(frame, "instruction"), _strings(frame, "input"), _strings(frame, "output"),
                _strings(frame, "system")]
    if fmt == "prompt_completion":
        return [_strings(frame, "prompt"), _strings(frame, "completion"), _strings(frame, "system")]
    if fmt == "text":
        return [_strings(frame, "text")]
    return [pa.array(
        ["\x1d".join(f"{m['role']}\x1e{m['content']}\x1e{m.get('tool_calls', '')}" for m in chat)
         for chat in (chats if chats is not None else conversations_of(frame, fmt, None))],
        pa.string(),
    )]


def normalise(part: "pa.Array") -> "pa.Array":
    """Case- and whitespace-insensitive form of texts: Python's ' '.join(text.split()).lower(), vectorised."""
    import pyarrow.compute as pc

    return pc.utf8_lower(pc.utf8_trim(pc.binary_join(pc.utf8_split_whitespace(part), " "), " "))


def _joined(parts: list["pa.Array"]) -> "pa.Array":
    """Parts joined with a unit separator; a trailing optional part (a system prompt) only where it is set."""
    import pyarrow.compute as pc

    *required, optional = parts if len(parts) > 1 else (parts + [None])
    joined = pc.binary_join_element_wise(*required, "\x1f") if len(required) > 1 else required[0]
    if optional is None:
        return joined
    return pc.if_else(pc.equal(optional, ""), joined, pc.binary_join_element_wise(joined, optional, "\x1f"))


def _hash64(keys: list[str]) -> np.ndarray:
    sha256 = hashlib.sha256
    return np.fromiter(
        (int.from_bytes(sha256(key.encode()).digest()[:8], "big") for key in keys), dtype=np.uint64, count=len(keys)
    )


def content_hashes(parts: list["pa.Array"]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, 64-bit sha256 hashes of its exact and of its normalised content (stable across runs and machines).

    Chunked, so the intermediate strings stay small, and the Arrow string work of the next chunk
    runs in a thread (it releases the GIL) while this one is hashed.
    """
    from concurrent.futures import ThreadPoolExecutor

    total = len(parts[0])

    def keys(start: int) -> tuple[list[str], list[str]]:
        chunk = [part.slice(start, HASH_CHUNK_ROWS) for part in parts]
        return _joined(chunk).to_pylist(), _joined([normalise(part) for part in chunk]).to_pylist()

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
        return pc.equal(pc.utf8_trim_whitespace(_strings(frame, column)), "").to_numpy(zero_copy_only=False)

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
    return ["\n".join(m["content"] for m in chat) for chat in conversations_of(part, fmt, None)]


# --- rendering, tokenizing, the over-long policy and the split ------------------------------------

@dataclass
class FormatSettings:
    """What format_dataset needs from the config."""

    template: str = "auto"
    system_prompt: str | None = None
    max_length: int = 512
    overlong: str = "truncate"
    eval_fraction: float = 0.1
    loss_on_responses_only: bool = True


@dataclass
class FormattedDataset:
    """What formatting produced: counts per step, token lengths, the template; the splits when kept in memory."""

    template: str
    format: str
    counts: dict[str, int]
    token_lengths: np.ndarray  # before truncation, every example that was tokenized
    eos_token: str
    pad_token: str | None
    preview: pd.DataFrame  # the first training examples
    train: "pa.Table | None" = None
    eval: "pa.Table | None" = None


class SplitSink:
    """Where formatted chunks go: kept in memory (tests, small data) or streamed to Parquet files."""

    def __init__(self, folder=None):
        self.folder = folder
        self.writers: dict = {}
        self.chunks: dict[str, list] = {"train": [], "eval": []}

    def write(self, split: str, table: "pa.Table") -> None:
        if self.folder is None:
            self.chunks[split].append(table)
            return
        import pyarrow.parquet as pq

        if split not in self.writers:
            self.writers[split] = pq.ParquetWriter(str(self.folder / f"{split}.parquet"), table.schema)
        self.writers[split].write_table(table)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def table(self, split: str) -> "pa.Table | None":
        import pyarrow as pa

        return pa.concat_tables(self.chunks[split]) if self.folder is None else None


def ensure_distinct_pad(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS, so padding can never mask the EOS label.

    Prefers its own pad, then its unknown token, then an unused reserved special token; a
    tokenizer with none of these keeps EOS as pad (our labels are built from the loss mask, not by
    comparing ids with the pad id, so EOS still keeps its label).
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return
    candidates = [tokenizer.unk_token] + [
        token for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab())
        if "pad" in token.lower() or "reserved" in token.lower()
    ]
    for token in candidates:
        if token and token not in (eos, tokenizer.bos_token):
            tokenizer.pad_token = token
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos


def _first_token_from(encoding, position: int, end: int) -> int | None:
    """Index of the token holding the first character at or after position (before end) that maps to one."""
    for char in range(position, end):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _or_length(token: int | None, encoding) -> int:
    return len(encoding.ids) if token is None else token


def _tokenize_chunk(tokenizer, rendered: Rendered, add_special_tokens: bool, responses_only: bool):
    """Token ids, per-token loss mask, untruncated lengths, row starts and prompt lengths of one chunk."""
    encodings = tokenizer.backend_tokenizer.encode_batch(rendered.text, add_special_tokens=add_special_tokens)
    ids = [encoding.ids for encoding in encodings]
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    prompt_tokens = np.array(
        [
            _or_length(_first_token_from(encoding, len(prompt), len(text)), encoding)
            for encoding, prompt, text in zip(encodings, rendered.prompt, rendered.text)
        ],
        dtype=np.int64,
    )
    if not responses_only:
        return flat, np.ones(len(flat), dtype=np.int8), lengths, starts, prompt_tokens
    if rendered.spans is None:
        position = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)
        mask = (position >= np.repeat(prompt_tokens, lengths)).astype(np.int8)
        return flat, mask, lengths, starts, prompt_tokens
    mask = np.zeros(len(flat), dtype=np.int8)
    for row, (encoding, spans) in enumerate(zip(encodings, rendered.spans)):
        for begin, end in spans:
            first = _first_token_from(encoding, begin, end)
            last = encoding.char_to_token(end - 1) if end > begin else None
            if first is not None:
                stop = (last + 1) if last is not None else lengths[row]
                mask[starts[row] + first : starts[row] + stop] = 1
    return flat, mask, lengths, starts, prompt_tokens


def _render_chunk(tokenizer, loaded: LoadedDataset, template, settings: FormatSettings, rows: slice) -> Rendered:
    frame = loaded.frame.iloc[rows]
    eos = tokenizer.eos_token or ""
    fmt = loaded.format
    if template.is_chat:
        chats = conversations_of(frame, fmt, settings.system_prompt)
        offset = rows.start or 0
        return render_chats(tokenizer, template, chats, tools_of(frame), lambda i: loaded.rows.where(offset + i))
    column = lambda name: _strings(frame, name).to_pylist()  # noqa: E731  (Arrow to Python in one call)
    if fmt == "alpaca":
        systems = column("system") if "system" in frame.columns else [""] * len(frame)
        prompts = [
            alpaca_prompt(i, x, s or settings.system_prompt)
            for i, x, s in zip(column("instruction"), column("input"), systems)
        ]
        return render_single_turn(prompts, column("output"), eos)
    if fmt == "prompt_completion":
        return render_single_turn(column("prompt"), column("completion"), eos)
    return render_single_turn([""] * len(frame), column("text"), eos)


def format_dataset(
    cleaned: CleanedRows,
    tokenizer,
    settings: FormatSettings,
    progress: ProgressFn | None = None,
    folder=None,
) -> FormattedDataset:
    """Render, tokenize (batched, in chunks), apply the over-long policy and split train/eval by content hash.

    With folder, the splits stream to folder/train.parquet and folder/eval.parquet chunk by chunk,
    so memory stays flat however many rows there are; without, they are returned in memory.
    """
    import pyarrow as pa

    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the tokenizer has no fast (Rust) implementation, which formatting needs for token offsets")
    loaded = cleaned.loaded
    template = resolve_template(settings.template, loaded.format, tokenizer.chat_template)
    ensure_distinct_pad(tokenizer)
    # Chat templates write their own BOS (e.g. Llama 3's <|begin_of_text|>); adding one would double it.
    add_special_tokens = not template.is_chat
    total = len(loaded.frame)
    held_out = cleaned.held_out(settings.eval_fraction)
    sink = SplitSink(folder)
    all_lengths, preview = [], []
    counts = dict(cleaned.counts, too_long_dropped=0, truncated=0, no_trainable_tokens=0, train_rows=0,
                  eval_rows=0, train_tokens=0)
    try:
        for start in range(0, total, TOKENIZE_CHUNK_ROWS):
            rows = slice(start, min(start + TOKENIZE_CHUNK_ROWS, total))
            rendered = _render_chunk(tokenizer, loaded, template, settings, rows)
            table, lengths = _examples_table(
                tokenizer, rendered, cleaned.hashes[rows], held_out[rows], add_special_tokens, settings, counts
            )
            all_lengths.append(lengths)
            in_eval = table.column("held_out")
            for split, selected in (("train", pa.compute.invert(in_eval)), ("eval", in_eval)):
                part = table.filter(selected).drop_columns(["held_out"])
                counts[f"{split}_rows"] += len(part)
                if len(part):
                    sink.write(split, part)
                if split == "train":
                    counts["train_tokens"] += int(pa.compute.sum(part.column("tokens")).as_py() or 0)
                    if len(preview) < 5:
                        preview.append(part.select(["prompt", "completion", "tokens"]).slice(0, 5).to_pandas())
            if progress is not None and total > TOKENIZE_CHUNK_ROWS:
                progress(f"formatted {rows.stop:,}/{total:,} rows")
    finally:
        sink.close()
    if not counts["train_rows"] + counts["eval_rows"]:
        raise DataError(
            f"{loaded.source}: no example is left with tokens to train on within training.max_length="
            f"{settings.max_length} ({counts['too_long_dropped']} too long, {counts['no_trainable_tokens']} with "
            "the response cut off); raise training.max_length"
        )
    require_both_splits(counts["train_rows"], counts["eval_rows"], settings.eval_fraction, loaded.source)
    return FormattedDataset(
        template=template.name,
        format=loaded.format,
        counts=counts,
        token_lengths=np.concatenate(all_lengths),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        preview=pd.concat(preview).head(5) if preview else pd.DataFrame(),
        train=sink.table("train"),
        eval=sink.table("eval"),
    )


def _examples_table(tokenizer, rendered: Rendered, hashes: np.ndarray, held_out: np.ndarray,
                    add_special_tokens: bool, settings: FormatSettings, counts: dict) -> tuple["pa.Table", np.ndarray]:
    """One chunk tokenized, with the over-long policy applied (counted); returns the table and untruncated lengths."""
    import pyarrow as pa

    max_length = settings.max_length
    flat, mask, lengths, starts, prompt_tokens = _tokenize_chunk(
        tokenizer, rendered, add_special_tokens, settings.loss_on_responses_only
    )
    over = lengths > max_length
    position = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, lengths)
    within = position < max_length
    trained = np.add.reduceat(mask * within, starts) if len(flat) else np.zeros(0)
    keep = trained > 0
    if settings.overlong == "drop":
        counts["too_long_dropped"] += int((over & keep).sum())
        keep &= ~over
    else:
        counts["truncated"] += int((over & keep).sum())
    counts["no_trainable_tokens"] += int((trained == 0).sum())
    token_keep = within & np.repeat(keep, lengths)
    kept_lengths = np.minimum(lengths, max_length)[keep]
    offsets = pa.array(np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int32))
    kept_hashes = hashes[keep]
    keep_array = pa.array(keep)
    table = pa.table(
        {
            "prompt": pa.array(rendered.prompt, pa.string()).filter(keep_array),
            "completion": pa.array(rendered.completion, pa.string()).filter(keep_array),
            "text": pa.array(rendered.text, pa.string()).filter(keep_array),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat[token_keep])),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask[token_keep])),
            "tokens": pa.array(kept_lengths.astype(np.int32)),
            "prompt_tokens": pa.array(np.minimum(prompt_tokens[keep], kept_lengths).astype(np.int32)),
            "truncated": pa.array(over[keep]),
            "ends_with_eos": pa.array(_ends_with_single_eos(flat, starts, lengths, tokenizer.eos_token_id)[keep]),
            "content_hash": pa.array(kept_hashes.view(np.int64)),
            "split_bucket": pa.array((kept_hashes % SPLIT_BUCKETS).astype(np.int32)),
            "held_out": pa.array(held_out[keep]),
        }
    )
    return table, lengths


def _ends_with_single_eos(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Per example, whether its (untruncated) tokens end in EOS exactly once."""
    if eos_id is None or not len(lengths):
        return np.zeros(len(lengths), dtype=bool)
    last = flat[starts + lengths - 1] == eos_id
    before_last = np.where(lengths > 1, flat[np.maximum(starts + lengths - 2, 0)] == eos_id, False)
    return last & ~before_last
