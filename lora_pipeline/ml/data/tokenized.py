"""Rendered examples to token arrays, and those to the rows of a formatted split. Dagster-free.

Everything per token lives in flat NumPy arrays (every example's tokens end to end, with per-row
lengths and starts): Python touches each example a constant number of times, never each token,
and the tokenizer's Encoding objects, which are large, are dropped once their ids are copied out.
"""

from __future__ import annotations

from collections import deque
from contextlib import closing
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import numpy as np

from lora_pipeline.ml.data.clean import SPLIT_BUCKETS
from lora_pipeline.ml.data.templates import Rendered

if TYPE_CHECKING:
    import pyarrow as pa

# Encodings cost ~9 kB a row on the Rust side (tokens as strings, offsets, masks), so the
# tokenizer gets a few thousand rows at a time; that is still ample work for its thread pool.
ENCODE_BATCH_ROWS = 5_000


@dataclass
class TokenizedRows:
    """Tokens of consecutive examples, end to end, with where each example starts and what it trains on."""

    ids: np.ndarray  # int32, every example's tokens end to end
    loss_mask: np.ndarray  # int8 per token: 1 where the loss is taken
    lengths: np.ndarray  # int64 tokens per example (untruncated)
    prompt_tokens: np.ndarray  # int64 tokens before the first trained character
    # With documents split into blocks: per example, where its blocks after the first begin in its
    # text (None for an example that fits in one); see split_into_blocks.
    block_chars: list | None = None

    @property
    def starts(self) -> np.ndarray:
        return row_starts(self.lengths)


def row_starts(lengths: np.ndarray) -> np.ndarray:
    """Where each row begins in its rows' values laid end to end."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


@dataclass(frozen=True)
class Blocks:
    """How an over-long document is cut: blocks of max_length tokens, each after the first led by the
    document's BOS when it starts with one (block_id), so every block reads as a document start."""

    max_length: int
    bos_id: int | None

    def stride(self, leads_with_bos: np.ndarray) -> np.ndarray:
        """Tokens of the document each block after the first carries."""
        return self.max_length - leads_with_bos.astype(np.int64)

    def content_starts(self, length: int, leads_with_bos: bool) -> range:
        """Token indices (in the document) where its blocks after the first begin."""
        return range(self.max_length, length, self.max_length - int(leads_with_bos))


def tokenized_chunks(tokenizer, render: Callable[[slice], Rendered], chunks: list[slice], add_special_tokens: bool,
                     responses_only: bool, blocks: Blocks | None = None) -> Iterator[tuple[Rendered, TokenizedRows]]:
    """Per chunk of rows, its rendered examples and their tokens, the loss located from the character spans.

    A worker thread renders and encodes one batch ahead (the tokenizer releases the GIL and runs
    on every core) while this thread copies the ids out of the batch before it and frees its
    Encoding objects: that Python work runs beside the tokenizer rather than between its calls.
    """
    batches = [slice(start, min(start + ENCODE_BATCH_ROWS, chunk.stop))
               for chunk in chunks for start in range(chunk.start, chunk.stop, ENCODE_BATCH_ROWS)]

    def render_and_encode(rows: slice) -> tuple[Rendered, list]:
        rendered = render(rows)
        return rendered, tokenizer.backend_tokenizer.encode_batch(rendered.text, add_special_tokens=add_special_tokens)

    with closing(_one_ahead(render_and_encode, batches)) as encoded_batches:
        for chunk in chunks:
            rendered_parts, token_parts = [], []
            for _ in range(chunk.start, chunk.stop, ENCODE_BATCH_ROWS):
                rendered, encodings = next(encoded_batches)
                rendered_parts.append(rendered)
                token_parts.append(_token_arrays(encodings, rendered, responses_only, blocks))
                del encodings  # freed now, on this thread, while the worker encodes the next batch
            yield _joined_rendered(rendered_parts), _joined_tokens(token_parts)


Item = TypeVar("Item")
Result = TypeVar("Result")


def _one_ahead(work: Callable[[Item], Result], items: list[Item]) -> Iterator[Result]:
    """work(item) for each item in order, on a worker thread that starts on the next item while the
    caller handles this one's result (so at most two results exist at once)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    try:
        futures: deque = deque()
        for item in items:
            futures.append(pool.submit(work, item))
            if len(futures) > 1:
                yield futures.popleft().result()  # the future goes, so the caller holds the only reference
        while futures:
            yield futures.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _joined_rendered(parts: list[Rendered]) -> Rendered:
    if len(parts) == 1:
        return parts[0]
    chats = parts[0].rows is not None
    return Rendered(
        text=[text for part in parts for text in part.text],
        spans=None if parts[0].spans is None else [spans for part in parts for spans in part.spans],
        prompt=[prompt for part in parts for prompt in part.prompt],
        completion=[completion for part in parts for completion in part.completion],
        rows=np.concatenate([part.rows for part in parts]) if chats else None,
        per_turn=np.concatenate([part.per_turn for part in parts]) if chats else None,
        dropped=[row for part in parts for row in part.dropped],
    )


def _joined_tokens(parts: list[TokenizedRows]) -> TokenizedRows:
    if len(parts) == 1:
        return parts[0]
    joined = TokenizedRows(*(np.concatenate([getattr(part, name) for part in parts])
                             for name in ("ids", "loss_mask", "lengths", "prompt_tokens")))
    if parts[0].block_chars is not None:
        joined.block_chars = [chars for part in parts for chars in part.block_chars]
    return joined


def _token_arrays(encodings: list, rendered: Rendered, responses_only: bool, blocks: Blocks | None) -> TokenizedRows:
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    # One pass over the ids lists, each freed as soon as it is copied (no list of lists kept alive).
    ids = np.fromiter(chain.from_iterable(map(attrgetter("ids"), encodings)), dtype=np.int32, count=int(lengths.sum()))
    prompt_tokens = np.fromiter(
        (_first_token_from(encoding, len(prompt), len(text))
         for encoding, prompt, text in zip(encodings, rendered.prompt, rendered.text)),
        dtype=np.int64, count=len(encodings),
    )
    if not responses_only:
        loss_mask = np.ones(len(ids), dtype=np.int8)
    elif rendered.spans is None:
        # One trained span per example, from its first response token to its end.
        response_starts = np.repeat(row_starts(lengths) + prompt_tokens, lengths)
        loss_mask = (np.arange(len(ids)) >= response_starts).view(np.int8)
    else:
        loss_mask = _span_mask(encodings, rendered.spans, lengths, row_starts(lengths))
    tokens = TokenizedRows(ids=ids, loss_mask=loss_mask, lengths=lengths, prompt_tokens=prompt_tokens)
    if blocks is not None:
        tokens.block_chars = _block_chars(encodings, rendered.text, tokens, blocks)
    return tokens


def _block_chars(encodings: list, texts: list[str], tokens: TokenizedRows, blocks: Blocks) -> list:
    """Per example longer than a block, the character where each of its blocks after the first begins
    (read from the Encoding while it exists: only it maps tokens back to characters)."""
    found: list = [None] * len(encodings)
    leads = _leads_with_bos(tokens.ids, tokens.starts, tokens.lengths, blocks.bos_id)
    for row in np.flatnonzero(tokens.lengths > blocks.max_length):
        encoding, chars, previous = encodings[row], [], 0
        for token in blocks.content_starts(int(tokens.lengths[row]), bool(leads[row])):
            previous = _char_of_token(encoding, token, previous, len(texts[row]))
            chars.append(previous)
        found[row] = chars
    return found


def _char_of_token(encoding, token: int, floor: int, end: int) -> int:
    """Where the token's characters begin; for a token with none (a special token), the next one's;
    never before floor, so the blocks' texts stay in order."""
    for candidate in range(token, len(encoding)):
        chars = encoding.token_to_chars(candidate)
        if chars is not None:
            return max(floor, chars[0])
    return end


def _leads_with_bos(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, bos_id: int | None) -> np.ndarray:
    if bos_id is None or not len(lengths):
        return np.zeros(len(lengths), dtype=bool)
    return (lengths > 0) & (ids[np.minimum(starts, max(len(ids) - 1, 0))] == bos_id)


def _first_token_from(encoding, position: int, end: int) -> int:
    """Index of the token holding the first character at or after position (before end) that maps to one,
    else the number of tokens (nothing from position on is in a token)."""
    for char in range(position, end):
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return len(encoding)


def _span_mask(encodings: list, spans: list[list[tuple[int, int]]], lengths: np.ndarray,
               starts: np.ndarray) -> np.ndarray:
    """The loss mask of examples with several trained character spans (conversations: every assistant turn)."""
    mask = np.zeros(int(lengths.sum()), dtype=np.int8)
    for row, (encoding, row_spans) in enumerate(zip(encodings, spans)):
        for begin, end in row_spans:
            first = _first_token_from(encoding, begin, end)
            if first == len(encoding):
                continue  # no character of the span maps to a token
            last = encoding.char_to_token(end - 1) if end > begin else None
            stop = (last + 1) if last is not None else lengths[row]
            mask[starts[row] + first : starts[row] + stop] = 1
    return mask


def split_into_blocks(tokens: TokenizedRows, rendered: Rendered, blocks: Blocks
                      ) -> tuple[TokenizedRows, Rendered, np.ndarray, np.ndarray]:
    """Every document longer than a block cut into blocks of at most max_length tokens, each an example.

    The first block is the document's first max_length tokens; each later one is led by the
    document's BOS (when it starts with one) and carries the next max_length - 1 tokens (else
    max_length). Only the true end keeps the EOS. Returns the blocks' tokens and texts, each
    block's document (row) and whether the document continues in the next block.
    """
    lengths, starts = tokens.lengths, tokens.starts
    leads = _leads_with_bos(tokens.ids, starts, lengths, blocks.bos_id)
    stride = blocks.stride(leads)
    extra = np.where(lengths > blocks.max_length, -(-(lengths - blocks.max_length) // stride), 0)
    per_document = 1 + extra
    document = np.repeat(np.arange(len(lengths)), per_document)
    number = np.arange(len(document)) - np.repeat(row_starts(per_document), per_document)
    first_token = np.where(number == 0, 0, blocks.max_length + (number - 1) * stride[document])
    carried = np.minimum(np.where(number == 0, blocks.max_length, stride[document]), lengths[document] - first_token)
    led = (number > 0) & leads[document]
    block_lengths = carried + led
    # Each block's tokens as positions in the documents' tokens; a leading BOS is the document's own.
    document_start = np.repeat(starts[document], block_lengths)
    offset = np.arange(int(block_lengths.sum())) - np.repeat(row_starts(block_lengths), block_lengths)
    position = document_start + np.repeat(first_token - led, block_lengths) + offset
    position = np.where(np.repeat(led, block_lengths) & (offset == 0), document_start, position)
    split = TokenizedRows(
        ids=tokens.ids[position],
        loss_mask=tokens.loss_mask[position],
        lengths=block_lengths,
        prompt_tokens=led + np.clip(tokens.prompt_tokens[document] - first_token, 0, carried),
    )
    continued = number < per_document[document] - 1
    return split, _block_texts(rendered, tokens.block_chars), document, continued


def _block_texts(rendered: Rendered, block_chars: list) -> Rendered:
    """Each block's stretch of its document's text; the prompt stays with the first block."""
    texts, prompts, completions = [], [], []
    for text, prompt, completion, chars in zip(rendered.text, rendered.prompt, rendered.completion, block_chars):
        if chars is None:
            texts.append(text), prompts.append(prompt), completions.append(completion)
            continue
        bounds = [0, *chars, len(text)]
        pieces = [text[begin:end] for begin, end in zip(bounds, bounds[1:])]
        texts += pieces
        prompts += [prompt] + [""] * (len(pieces) - 1)
        completions += [pieces[0][len(prompt):]] + pieces[1:]
    return Rendered(text=texts, spans=None, prompt=prompts, completion=completions)


def examples_table(tokenized: TokenizedRows, rendered: Rendered, hashes: np.ndarray, held_out: np.ndarray,
                   eos_token_id: int | None, max_length: int, overlong: str, counts: dict,
                   blocks: Blocks | None = None) -> "pa.Table":
    """The examples as a table, with the over-long policy applied and counted (truncate, drop or split).

    Split documents' blocks share their document's content hash, and so its side of the train/eval
    split; the table then says which blocks continue in the next (`continued`).
    """
    import pyarrow as pa

    over = tokenized.lengths > max_length
    continued = None
    if overlong == "split":
        continued = np.zeros(len(over), dtype=bool)
        if over.any():
            tokenized, rendered, document, continued = split_into_blocks(tokenized, rendered, blocks)
            counts["split_documents"] += int(over.sum())
            counts["blocks_added"] += len(document) - len(over)
            hashes, held_out = hashes[document], held_out[document]
            over = tokenized.lengths > max_length
    lengths, starts, mask = tokenized.lengths, tokenized.starts, tokenized.loss_mask
    any_over = bool(over.any())
    # Per token, whether it lies within max_length; only worked out when some example is longer.
    within = np.arange(len(mask)) - np.repeat(starts, lengths) < max_length if any_over else None
    if not len(mask):
        trained = np.zeros(0, dtype=np.int64)
    else:
        trained = np.add.reduceat(mask * within if any_over else mask, starts)
    keep = trained > 0
    # Examples whose whole response lies beyond max_length are lost to it too, not merely untrainable.
    response_beyond = over & ~keep
    counts["responses_beyond_max_length"] += int(response_beyond.sum())
    counts["tokens_lost_to_max_length"] += int(lengths[response_beyond].sum())
    if overlong == "drop":
        counts["too_long_dropped"] += int((over & keep).sum())
        counts["tokens_lost_to_max_length"] += int(lengths[over & keep].sum())
        keep &= ~over
    else:
        counts["truncated"] += int((over & keep).sum())
        counts["tokens_lost_to_max_length"] += int((lengths[over & keep] - max_length).sum())
    counts["no_trainable_tokens"] += int((trained == 0).sum())
    kept_lengths = np.minimum(lengths, max_length)[keep]
    every_row_kept = bool(keep.all())
    if every_row_kept and not any_over:
        ids, loss_mask = tokenized.ids, mask
    else:
        token_keep = np.repeat(keep, lengths)
        if any_over:
            token_keep &= within
        ids, loss_mask = tokenized.ids[token_keep], mask[token_keep]
    offsets = np.zeros(len(kept_lengths) + 1, dtype=np.int32)
    np.cumsum(kept_lengths, out=offsets[1:])
    offsets = pa.array(offsets)

    def kept(values):
        return values if every_row_kept else values[keep]

    def kept_text(texts: list[str]) -> "pa.Array":
        return pa.array(texts if every_row_kept else [texts[i] for i in np.flatnonzero(keep)], pa.string())

    kept_hashes = kept(hashes)
    continues = {} if continued is None else {"continued": pa.array(kept(continued))}
    return pa.table(
        {
            "prompt": kept_text(rendered.prompt),
            "completion": kept_text(rendered.completion),
            "text": kept_text(rendered.text),
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(loss_mask)),
            "tokens": pa.array(kept_lengths.astype(np.int32)),
            "prompt_tokens": pa.array(np.minimum(kept(tokenized.prompt_tokens), kept_lengths).astype(np.int32)),
            "truncated": pa.array(kept(over)),
            "ends_with_eos": pa.array(kept(_ends_with_single_eos(tokenized.ids, starts, lengths, eos_token_id))),
            "content_hash": pa.array(kept_hashes.view(np.int64)),
            "split_bucket": pa.array((kept_hashes % SPLIT_BUCKETS).astype(np.int32)),
            **continues,
            "held_out": pa.array(kept(held_out)),
        }
    )


def _ends_with_single_eos(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Per example, whether its (untruncated) tokens end in EOS exactly once."""
    if eos_id is None or not len(lengths):
        return np.zeros(len(lengths), dtype=bool)
    last = ids[starts + lengths - 1] == eos_id
    before_last = np.where(lengths > 1, ids[np.maximum(starts + lengths - 2, 0)] == eos_id, False)
    return last & ~before_last
