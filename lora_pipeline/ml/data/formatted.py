"""formatted_dataset's side: each cleaned row rendered with its template, tokenized in chunks, the
over-long policy applied and split train/eval by a hash of the normalised content. Dagster-free.

The tokenizer is the bulk of the work: it runs on a worker thread, a batch ahead, while this
thread turns what it returned into arrays, then tables, and writes them (see tokenized.py).

Every count is kept, so the metadata can say where each row went.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.clean import CleanedRows, require_both_splits, text_column
from lora_pipeline.ml.data.formats import conversations_of, tools_of
from lora_pipeline.ml.data.quality import LengthAdvice
from lora_pipeline.ml.data.raw import LoadedDataset
from lora_pipeline.ml.data.templates import (
    ChatPolicy,
    Rendered,
    alpaca_prompt,
    render_chats,
    render_single_turn,
    resolve_template,
)
from lora_pipeline.ml.data.tokenized import Blocks, examples_table, tokenized_chunks
from lora_pipeline.ml.heap import long_lived_heap_frozen

if TYPE_CHECKING:
    import pyarrow as pa

# Rows per chunk, and so per Parquet row group of each split: changing it changes the files' bytes
# (not their rows), and with them the content digests that downstream stages are cached on.
TOKENIZE_CHUNK_ROWS = 20_000
ProgressFn = Callable[[str], None]


@dataclass
class FormatSettings:
    """What format_dataset needs from the config."""

    template: str = "auto"
    system_prompt: str | None = None
    max_length: int = 512
    overlong: str = "auto"  # truncate, drop or split; auto: overlong_policy of the format
    eval_fraction: float = 0.1
    loss_on_responses_only: bool = True
    turn_flag_field: str | None = None  # the message field with per-turn training flags (formats.turn_flag)
    turns: str = "auto"  # one sequence per conversation, or one example per learned turn (templates.ChatPolicy)
    reasoning: str = "auto"  # reasoning to the template's field, inline, or dropped
    unrenderable: str = "refuse"  # a row the template cannot render: refuse it, or drop it (counted)
    max_unrenderable_rate: float = 0.05  # with 'drop': the largest share of rows that may be dropped

    @property
    def chat_policy(self) -> ChatPolicy:
        return ChatPolicy(turns=self.turns, reasoning=self.reasoning, unrenderable=self.unrenderable)


def lost_to_max_length(counts: dict) -> int:
    """Examples dropped because of max_length: over it and dropped, or with their whole response beyond it."""
    return counts["too_long_dropped"] + counts.get("responses_beyond_max_length", 0)


@dataclass
class FormattedDataset:
    """What formatting produced: counts per step, token lengths, the template; the splits when kept in memory."""

    template: str
    format: str
    overlong: str  # the policy that applied (overlong_policy)
    counts: dict[str, int]
    token_lengths: np.ndarray  # before truncation, every example that was tokenized
    eos_token: str
    pad_token: str | None
    preview: pd.DataFrame  # the first training examples
    train: "pa.Table | None" = None
    eval: "pa.Table | None" = None
    sources: list[dict] | None = None  # a mixture's per-source rows and tokens (mixture.py)
    truncation_rate: float | None = None  # a mixture's share of examples over max_length where that loses tokens


def overlong_policy(overlong: str, fmt: str) -> str:
    """The over-long policy that applies: `auto` splits plain-text documents (continued pretraining,
    where every token is data) and truncates instructions and conversations (where a block without
    its prompt would teach answers to nothing)."""
    if overlong != "auto":
        return overlong
    return "split" if fmt == "text" else "truncate"


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

        return pa.concat_tables(self.chunks[split]) if self.folder is None and self.chunks[split] else None


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


def _render_chunk(tokenizer, loaded: LoadedDataset, template, settings: FormatSettings, rows: slice) -> Rendered:
    frame = loaded.frame.iloc[rows]
    eos = tokenizer.eos_token or ""
    fmt = loaded.format
    if template.is_chat:
        offset = rows.start or 0
        where = lambda i: loaded.rows.where(offset + i)  # noqa: E731
        chats = conversations_of(frame, fmt, settings.system_prompt, settings.turn_flag_field, where)
        return render_chats(tokenizer, template, chats, tools_of(frame), where, settings.chat_policy, offset)
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
    check_splits: bool = True,
) -> FormattedDataset:
    """Render, tokenize (batched, in chunks), apply the over-long policy and split train/eval by content hash.

    With folder, the splits stream to folder/train.parquet and folder/eval.parquet chunk by chunk,
    so memory stays flat however many rows there are; without, they are returned in memory.
    check_splits: refuse an empty train or eval side (off for one source of a mixture, which checks the whole).
    """
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
    overlong = overlong_policy(settings.overlong, loaded.format)
    blocks = Blocks(settings.max_length, tokenizer.bos_token_id) if overlong == "split" else None
    counts = dict(cleaned.counts, too_long_dropped=0, truncated=0, split_documents=0, blocks_added=0,
                  tokens_lost_to_max_length=0, responses_beyond_max_length=0, no_trainable_tokens=0, train_rows=0, eval_rows=0, train_tokens=0,
                  unrenderable_dropped=0, per_turn_rows=0, per_turn_examples=0, per_turn_extra_tokens=0)
    dropped: list[tuple[int, str]] = []
    chunks = [slice(start, min(start + TOKENIZE_CHUNK_ROWS, total)) for start in range(0, total, TOKENIZE_CHUNK_ROWS)]

    def render(rows: slice) -> Rendered:
        return _render_chunk(tokenizer, loaded, template, settings, rows)

    # The tokenizer hands back thousands of GC-tracked Encoding objects a batch; the collections they
    # set off need not walk the rest of the process's heap. Measured: ~5% of the stage's CPU.
    try:
        tokenized = tokenized_chunks(tokenizer, render, chunks, add_special_tokens, settings.loss_on_responses_only,
                                     blocks)
        with long_lived_heap_frozen(), closing(tokenized):
            for rows, (rendered, tokens) in zip(chunks, tokenized):
                if rendered.rows is not None:  # chat rows: examples per row vary (per-turn, dropped)
                    rows = rendered.rows
                    dropped += rendered.dropped
                    _count_turn_examples(rendered, tokens.lengths, counts)
                table = examples_table(tokens, rendered, cleaned.hashes[rows], held_out[rows],
                                       tokenizer.eos_token_id, settings.max_length, overlong, counts, blocks)
                all_lengths.append(tokens.lengths)
                del rendered, tokens  # the table holds what is still needed
                _write_splits(table, sink, counts, preview)
                if progress is not None and total > TOKENIZE_CHUNK_ROWS:
                    progress(f"formatted {rows.stop:,}/{total:,} rows")
    finally:
        sink.close()
    _check_dropped(dropped, total, settings.max_unrenderable_rate, loaded)
    if not counts["train_rows"] + counts["eval_rows"]:
        advice = LengthAdvice.of(np.concatenate(all_lengths), settings.max_length)
        raise DataError(
            f"{loaded.source}: no example is left with tokens to train on within training.max_length="
            f"{settings.max_length} ({counts['too_long_dropped']} too long, {counts['no_trainable_tokens']} with "
            f"the response cut off); {advice.suggestion()}"
        )
    if check_splits:
        require_both_splits(counts["train_rows"], counts["eval_rows"], settings.eval_fraction, loaded.source)
    return FormattedDataset(
        template=template.name,
        format=loaded.format,
        overlong=overlong,
        counts=counts,
        token_lengths=np.concatenate(all_lengths),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        preview=with_learned_parts(pd.concat(preview).head(5), tokenizer) if preview else pd.DataFrame(),
        train=sink.table("train"),
        eval=sink.table("eval"),
    )


def _count_turn_examples(rendered: Rendered, lengths: np.ndarray, counts: dict) -> None:
    """What one-example-per-learned-turn cost: rows split so, their examples, and their tokens beyond
    the longest example of each row (about what the one sequence would have had)."""
    counts["unrenderable_dropped"] += len(rendered.dropped)
    split = rendered.per_turn
    if not split.any():
        return
    rows, lengths = rendered.rows[split], lengths[split]
    firsts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))  # a row's examples are adjacent
    counts["per_turn_rows"] += len(firsts)
    counts["per_turn_examples"] += int(split.sum())
    counts["per_turn_extra_tokens"] += int(lengths.sum() - np.maximum.reduceat(lengths, firsts).sum())


def _check_dropped(dropped: list[tuple[int, str]], total: int, max_rate: float, loaded: LoadedDataset) -> None:
    """Refuse a dataset whose dropped rows pass the cap, naming the first and why (one bad row never
    silently changes the rest; many mean the template is wrong for the data)."""
    if not dropped or len(dropped) <= max_rate * total:
        return
    row, reason = dropped[0]
    raise DataError(
        f"{loaded.source}: the template cannot render {len(dropped):,} of {total:,} rows "
        f"({len(dropped) / total:.1%}, above dataset.max_unrenderable_rate={max_rate}); the first, "
        f"{loaded.rows.where(row)}: {reason}"
    )


LEARNED_OPEN, LEARNED_CLOSE = "⟦", "⟧"  # marks the learned stretches of an example shown to a person


def with_learned_parts(preview: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """The preview rows with what the loss is taken on: each learned stretch decoded and separated by ' | ',
    and the whole example with the learned stretches marked ⟦ ⟧ (marked)."""
    learned, marked = [], []
    for ids, mask in zip(preview.pop("input_ids"), preview.pop("loss_mask")):
        mask = np.asarray(mask, dtype=bool)
        edges = [0, *np.flatnonzero(np.diff(mask.astype(np.int8))) + 1, len(mask)]
        runs = [(start, stop, bool(mask[start])) for start, stop in zip(edges, edges[1:]) if stop > start]
        texts = [tokenizer.decode(ids[start:stop]) for start, stop, _ in runs]
        learned.append(" | ".join(text for text, (_, _, on) in zip(texts, runs) if on))
        marked.append("".join(f"{LEARNED_OPEN}{text}{LEARNED_CLOSE}" if on else text
                              for text, (_, _, on) in zip(texts, runs)))
    return preview.assign(learned=learned, marked=marked)


def _write_splits(table: "pa.Table", sink: SplitSink, counts: dict, preview: list) -> None:
    """One chunk's examples to the train and eval sinks, counted; the first training rows kept for the preview."""
    import pyarrow.compute as pc

    in_eval = table.column("held_out")
    for split, selected in (("train", pc.invert(in_eval)), ("eval", in_eval)):
        part = table.filter(selected).drop_columns(["held_out"])
        counts[f"{split}_rows"] += len(part)
        if len(part):
            sink.write(split, part)
        if split == "train":
            counts["train_tokens"] += int(pc.sum(part.column("tokens")).as_py() or 0)
            if len(preview) < 5:
                preview.append(part.select(["prompt", "completion", "tokens", "input_ids", "loss_mask"])
                               .slice(0, 5).to_pandas())
