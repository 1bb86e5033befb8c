"""Preference rows in the layouts other tools write, as (prompt, chosen, rejected) rendered and tokenized.

Layouts, told apart by their columns:
- ``prompt`` / ``chosen`` / ``rejected``: each a string, a message ({role, content}) or a list of messages
  (the prompt a conversation, the answers one assistant message);
- ``chosen`` / ``rejected`` alone: two whole conversations sharing their start, which is the prompt;
- ``conversations`` (ShareGPT turns or role/content messages) with ``chosen`` / ``rejected`` answers.

The prompt is rendered with the chat template and its generation prompt; each answer is what the template
adds after it, ending in the tokenizer's EOS exactly once (what the model must produce to stop). Pairs are
split train/held-out by a hash of the rendered prompt, so every pair of a prompt lands on one side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.clean import SPLIT_BUCKETS
from lora_pipeline.ml.data.formats import SHAREGPT_ROLES, _maybe_json, _text_of
from lora_pipeline.ml.data.templates import Template, with_single_eos

PREFERENCE_COLUMNS = ("chosen", "rejected")


def is_preference(frame: pd.DataFrame) -> bool:
    """Whether the rows are preference pairs (they have chosen and rejected)."""
    return set(PREFERENCE_COLUMNS) <= set(frame.columns)


@dataclass(frozen=True)
class Pair:
    """One preference pair as messages: the prompt conversation and the two answers."""

    prompt: list[dict]
    chosen: dict
    rejected: dict


def _message(value: Any, default_role: str, where: str, field: str) -> dict:
    value = _maybe_json(value)
    if isinstance(value, str):
        return {"role": default_role, "content": value}
    if isinstance(value, dict) and {"from", "value"} <= set(value):
        return {"role": SHAREGPT_ROLES.get(value["from"], value["from"]), "content": value["value"]}
    if isinstance(value, dict) and "role" in value:
        return {"role": value["role"], "content": _text_of(value.get("content"))}
    raise DataError(f"{where}: field '{field}' must be text, a message or a list of messages, "
                    f"found {type(value).__name__}")


def _messages(value: Any, where: str, field: str) -> list[dict]:
    value = _maybe_json(value)
    if isinstance(value, list):
        return [_message(item, "user", where, field) for item in value]
    return [_message(value, "user", where, field)]


def _answer(value: Any, where: str, field: str) -> tuple[list[dict], dict]:
    """An answer field as (the messages before its last one, its last message): a conversation or one answer."""
    value = _maybe_json(value)
    messages = [_message(item, "assistant", where, field) for item in value] if isinstance(value, list) \
        else [_message(value, "assistant", where, field)]
    if not messages:
        raise DataError(f"{where}: field '{field}' is empty")
    return messages[:-1], messages[-1]


def pairs_of(frame: pd.DataFrame, where: Callable[[int], str], system_prompt: str | None = None) -> list[Pair]:
    """Every row as a Pair; a DataError names the row and the field for the first that is not one."""
    pairs = []
    for index, row in enumerate(frame.to_dict("records")):
        at = where(index)
        before_chosen, chosen = _answer(row["chosen"], at, "chosen")
        before_rejected, rejected = _answer(row["rejected"], at, "rejected")
        if "prompt" in row and row["prompt"] is not None:
            prompt = _messages(row["prompt"], at, "prompt") + before_chosen
        elif "conversations" in row and row["conversations"] is not None:
            prompt = _messages(row["conversations"], at, "conversations") + before_chosen
        else:  # two whole conversations: the prompt is what they share
            if before_chosen != before_rejected:
                raise DataError(f"{at}: 'chosen' and 'rejected' are conversations that differ before their last "
                                "message, so they share no prompt; give the prompt in a 'prompt' field")
            prompt = before_chosen
        if not prompt:
            raise DataError(f"{at}: no prompt (a 'prompt' field, 'conversations', or conversations in 'chosen' and "
                            "'rejected' that share their start)")
        for field, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer["role"] != "assistant":
                raise DataError(f"{at}: field '{field}' ends with a {answer['role']} message; it must be the answer")
            if not str(answer["content"]).strip():
                raise DataError(f"{at}: field '{field}' is empty")
        if chosen["content"].strip() == rejected["content"].strip():
            raise DataError(f"{at}: 'chosen' and 'rejected' are the same answer; a pair must differ")
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


@dataclass
class PreferenceExamples:
    """Tokenized pairs: prompt ids and each answer's ids (completion only, ending in EOS), the texts, the split."""

    frame: pd.DataFrame  # prompt, chosen, rejected (texts), prompt_ids, chosen_ids, rejected_ids, content_hash, held_out
    too_long: int  # pairs whose prompt and longer answer pass max_length


def tokenize_pairs(pairs: list[Pair], tokenizer, template: Template, where: Callable[[int], str],
                   eval_fraction: float, max_length: int) -> PreferenceExamples:
    """Render each pair with the chat template and tokenize it; refuse a template that renders the prompt
    differently once an answer follows (the answer could not be located)."""
    from lora_pipeline.ml.data.clean import _hash64

    import pyarrow as pa

    eos = tokenizer.eos_token or ""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for index, pair in enumerate(pairs):
        def render(messages, generation_prompt=False):
            return tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        try:
            prompt = render(pair.prompt, generation_prompt=True)
            answers = [render(pair.prompt + [answer]) for answer in (pair.chosen, pair.rejected)]
        except Exception as exc:  # jinja2 errors and templates' raise_exception
            raise DataError(f"{where(index)}: the {template.name} chat template cannot render this pair: "
                            f"{str(exc).strip().splitlines()[0]}") from None
        for field, full in zip(("chosen", "rejected"), answers):
            if not full.startswith(prompt):
                raise DataError(f"{where(index)}: the {template.name} chat template renders the prompt differently "
                                f"once the '{field}' answer follows, so the answer cannot be located")
        rows["prompt"].append(prompt)
        rows["chosen"].append(with_single_eos(answers[0][len(prompt):], eos))
        rows["rejected"].append(with_single_eos(answers[1][len(prompt):], eos))
    frame = pd.DataFrame(rows)
    for column in ("prompt", "chosen", "rejected"):
        frame[f"{column}_ids"] = [list(ids) for ids in
                                  tokenizer(list(frame[column]), add_special_tokens=False)["input_ids"]]
    hashes = _hash64(pa.array(frame["prompt"].map(lambda text: " ".join(text.split()).lower()), pa.string()))
    frame["content_hash"] = hashes.view(np.int64)
    frame["held_out"] = (hashes % SPLIT_BUCKETS) < round(eval_fraction * SPLIT_BUCKETS)
    longest = frame["prompt_ids"].map(len) + np.maximum(frame["chosen_ids"].map(len), frame["rejected_ids"].map(len))
    return PreferenceExamples(frame=frame, too_long=int((longest > max_length).sum()))
