"""formatted_dataset's side: each cleaned row rendered with its template, tokenized in chunks, the
over-long policy applied and split train/eval by a hash of the normalised content. Dagster-free.

Every count is kept, so the metadata can say where each row went.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.clean import SPLIT_BUCKETS, CleanedRows, require_both_splits, text_column
from lora_pipeline.ml.data.formats import conversations_of, tools_of
from lora_pipeline.ml.data.raw import LoadedDataset
from lora_pipeline.ml.data.templates import Rendered, alpaca_prompt, render_chats, render_single_turn, resolve_template

if TYPE_CHECKING:
    import pyarrow as pa

TOKENIZE_CHUNK_ROWS = 20_000
ProgressFn = Callable[[str], None]


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
    column = lambda name: text_column(frame, name).to_pylist()  # noqa: E731  (Arrow to Python in one call)
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
