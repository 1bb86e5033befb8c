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
from lora_pipeline.ml.formats import (
    CONVERSATIONAL,
    conversations_of,
    detect_format,
    storable,
    tools_of,
    validate_rows,
)
from lora_pipeline.ml.sources import SourceRequest, SourceRows, read_source
from lora_pipeline.ml.templates import Rendered, alpaca_prompt, render_chats, render_single_turn, resolve_template

if TYPE_CHECKING:
    import pyarrow as pa

SPLIT_BUCKETS = 10_000
TOKENIZE_CHUNK_ROWS = 20_000
TOKENIZER_CORPUS_ROWS = 50_000
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


def load_dataset(settings) -> LoadedDataset:
    """Read dataset.source and check every row against dataset.format ('auto' detects it)."""
    request = SourceRequest(
        source=settings.source,
        split=settings.split,
        subset=settings.subset,
        revision=settings.revision,
        columns=dict(settings.columns),
        max_rows=settings.max_rows,
    )
    rows = read_source(request)
    detected = settings.format == "auto"
    fmt = detect_format(rows.frame, rows.source) if detected else settings.format
    validate_rows(rows.frame, fmt, rows.where, rows.source)
    return LoadedDataset(rows=rows, format=fmt, detected=detected)


def fingerprint(frame: pd.DataFrame) -> str:
    """Content hash of a table: equal rows in equal order give an equal fingerprint."""
    stored, _ = storable(frame)
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, stored.columns)).encode())
    for column in stored.columns:
        values = stored[column]
        for start in range(0, len(values), 100_000):
            chunk = values.iloc[start : start + 100_000]
            digest.update("\x1e".join("\x00" if v is None or v != v else str(v) for v in chunk).encode())
    return digest.hexdigest()


# --- content keys, cleaning and the split ---------------------------------------------------------

def _text(value) -> str:
    return value if isinstance(value, str) else ""


def content_parts(loaded: LoadedDataset) -> list[tuple[str, ...]]:
    """What makes two rows the same example: the texts the model sees, in order, per row."""
    frame, fmt = loaded.frame, loaded.format
    if fmt == "alpaca":
        inputs = frame["input"] if "input" in frame.columns else [""] * len(frame)
        parts = [(_text(i), _text(x), _text(o)) for i, x, o in zip(frame["instruction"], inputs, frame["output"])]
        if "system" in frame.columns:
            parts = [p + (_text(s),) if _text(s) else p for p, s in zip(parts, frame["system"])]
        return parts
    if fmt == "prompt_completion":
        return [(_text(p), _text(c)) for p, c in zip(frame["prompt"], frame["completion"])]
    if fmt == "text":
        return [(_text(t),) for t in frame["text"]]
    return [
        tuple(f"{m['role']}\x1e{m['content']}\x1e{m.get('tool_calls', '')}" for m in chat)
        for chat in conversations_of(frame, fmt, None)
    ]


def normalise(part: str) -> str:
    """Case- and whitespace-insensitive form of a text, for duplicate detection and the split."""
    return " ".join(part.split()).lower()


def content_hash(parts: tuple[str, ...]) -> int:
    """64-bit hash of the normalised content (stable across runs, machines and Python versions)."""
    normalised = "\x1f".join(normalise(part) for part in parts)
    return int.from_bytes(hashlib.sha256(normalised.encode()).digest()[:8], "big")


def is_eval_bucket(bucket: int, eval_fraction: float) -> bool:
    """Whether a split bucket falls in the held-out share."""
    return bucket < round(eval_fraction * SPLIT_BUCKETS)


def _is_empty(loaded: LoadedDataset) -> np.ndarray:
    frame, fmt = loaded.frame, loaded.format
    blank = lambda values: np.array([not _text(v).strip() for v in values], dtype=bool)  # noqa: E731
    if fmt == "alpaca":
        return blank(frame["instruction"]) | blank(frame["output"])
    if fmt == "prompt_completion":
        return blank(frame["completion"])
    if fmt == "text":
        return blank(frame["text"])
    return np.array(
        [not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in chat)
         for chat in conversations_of(frame, fmt, None)],
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
    keep = ~_is_empty(loaded)
    counts["empty"] = int((~keep).sum())
    parts = content_parts(loaded)
    exact = pd.Series(["\x1f".join(p) for p in parts])
    exact_duplicate = exact.duplicated().to_numpy() & keep
    if dedupe != "none":
        keep &= ~exact_duplicate
    counts["exact_duplicates"] = int(exact_duplicate.sum()) if dedupe != "none" else 0
    hashes = np.fromiter((content_hash(p) for p in parts), dtype=np.uint64, count=len(parts))
    normalised_duplicate = np.zeros(len(parts), dtype=bool)
    if dedupe == "normalized":
        surviving = np.flatnonzero(keep)
        normalised_duplicate[surviving] = pd.Series(hashes[surviving]).duplicated().to_numpy()
        keep &= ~normalised_duplicate
    counts["normalized_duplicates"] = int(normalised_duplicate.sum())
    kept = LoadedDataset(
        rows=SourceRows(loaded.frame[keep].reset_index(drop=True), loaded.source, loaded.rows.kind, []),
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
    """Tokenized train/eval tables and what happened on the way."""

    train: "pa.Table"
    eval: "pa.Table"
    template: str
    format: str
    counts: dict[str, int]
    token_lengths: np.ndarray  # before truncation, every example that was tokenized
    eos_token: str
    pad_token: str | None


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
    if fmt == "alpaca":
        inputs = frame["input"] if "input" in frame.columns else [""] * len(frame)
        systems = frame["system"] if "system" in frame.columns else [settings.system_prompt] * len(frame)
        prompts = [
            alpaca_prompt(i, _text(x), _text(s) or settings.system_prompt)
            for i, x, s in zip(frame["instruction"], inputs, systems)
        ]
        return render_single_turn(prompts, list(frame["output"]), eos)
    if fmt == "prompt_completion":
        return render_single_turn(list(frame["prompt"]), list(frame["completion"]), eos)
    return render_single_turn([""] * len(frame), list(frame["text"]), eos)


def format_dataset(
    cleaned: CleanedRows, tokenizer, settings: FormatSettings, progress: ProgressFn | None = None
) -> FormattedDataset:
    """Render, tokenize (batched, in chunks), apply the over-long policy and split train/eval by content hash."""
    import pyarrow as pa

    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the tokenizer has no fast (Rust) implementation, which formatting needs for token offsets")
    loaded = cleaned.loaded
    template = resolve_template(settings.template, loaded.format, tokenizer.chat_template)
    ensure_distinct_pad(tokenizer)
    # Chat templates write their own BOS (e.g. Llama 3's <|begin_of_text|>); adding one would double it.
    add_special_tokens = not template.is_chat
    eos_id = tokenizer.eos_token_id
    max_length = settings.max_length
    total = len(loaded.frame)
    held_out_all = cleaned.held_out(settings.eval_fraction)
    tables, keep_rows, all_lengths = [], [], []
    counts = dict(cleaned.counts, too_long_dropped=0, truncated=0, no_trainable_tokens=0)
    for start in range(0, total, TOKENIZE_CHUNK_ROWS):
        rows = slice(start, min(start + TOKENIZE_CHUNK_ROWS, total))
        rendered = _render_chunk(tokenizer, loaded, template, settings, rows)
        flat, mask, lengths, starts, prompt_tokens = _tokenize_chunk(
            tokenizer, rendered, add_special_tokens, settings.loss_on_responses_only
        )
        all_lengths.append(lengths)
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
        offsets = np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int32)
        chunk_hashes = cleaned.hashes[rows][keep]
        index = np.flatnonzero(keep)
        tables.append(
            pa.table(
                {
                    "prompt": pa.array([rendered.prompt[i] for i in index], pa.string()),
                    "completion": pa.array([rendered.completion[i] for i in index], pa.string()),
                    "text": pa.array([rendered.text[i] for i in index], pa.string()),
                    "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[token_keep])),
                    "loss_mask": pa.ListArray.from_arrays(pa.array(offsets), pa.array(mask[token_keep])),
                    "tokens": pa.array(kept_lengths.astype(np.int32)),
                    "prompt_tokens": pa.array(np.minimum(prompt_tokens[keep], kept_lengths).astype(np.int32)),
                    "truncated": pa.array(over[keep]),
                    "ends_with_eos": pa.array(_ends_with_single_eos(flat, starts, lengths, eos_id)[keep]),
                    "content_hash": pa.array(chunk_hashes.view(np.int64)),
                    "split_bucket": pa.array((chunk_hashes % SPLIT_BUCKETS).astype(np.int32)),
                }
            )
        )
        keep_rows.append(held_out_all[rows][keep])
        if progress is not None and total > TOKENIZE_CHUNK_ROWS:
            progress(f"formatted {rows.stop:,}/{total:,} rows")
    table = pa.concat_tables(tables)
    held_out = np.concatenate(keep_rows)
    counts["train_rows"] = int((~held_out).sum())
    counts["eval_rows"] = int(held_out.sum())
    if not len(table):
        raise DataError(
            f"{loaded.source}: no example is left with tokens to train on within training.max_length="
            f"{max_length} ({counts['too_long_dropped']} too long, {counts['no_trainable_tokens']} with the "
            "response cut off); raise training.max_length"
        )
    require_both_splits(counts["train_rows"], counts["eval_rows"], settings.eval_fraction, loaded.source)
    return FormattedDataset(
        train=table.filter(pa.array(~held_out)),
        eval=table.filter(pa.array(held_out)),
        template=template.name,
        format=loaded.format,
        counts=counts,
        token_lengths=np.concatenate(all_lengths),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
    )


def _ends_with_single_eos(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Per example, whether its (untruncated) tokens end in EOS exactly once."""
    if eos_id is None or not len(lengths):
        return np.zeros(len(lengths), dtype=bool)
    last = flat[starts + lengths - 1] == eos_id
    before_last = np.where(lengths > 1, flat[np.maximum(starts + lengths - 2, 0)] == eos_id, False)
    return last & ~before_last
