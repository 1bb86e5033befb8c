"""Preference rows in the layouts other tools write, as (prompt, chosen, rejected) rendered and tokenized.

Layouts, told apart by their columns:
- ``prompt`` / ``chosen`` / ``rejected``: each a string, a message ({role, content}) or a list of messages
  (the prompt a conversation, the answers one assistant message, or whole conversations that repeat the
  prompt, as UltraFeedback's do);
- ``chosen`` / ``rejected`` alone: two whole conversations sharing their start, which is the prompt, as
  message lists or as Human/Assistant transcripts (Anthropic HH-RLHF);
- ``conversations`` (ShareGPT turns or role/content messages) with ``chosen`` / ``rejected`` answers;
- ``instruction`` (and ``input``) with ``chosen`` / ``rejected`` (LLaMA-Factory's Alpaca ranking rows).
A ``system`` column becomes the system message (else dataset.system_prompt).

KTO also reads unpaired rows, ``prompt`` / ``completion`` / ``label`` (one answer judged desirable or not,
the layout TRL's KTO datasets use); a pair is the same evidence as two such rows, which ``unpair`` makes.

The prompt is rendered with the chat template and its generation prompt; each answer is what the template
adds after it, ending in the tokenizer's EOS exactly once (what the model must produce to stop). Rows are
split train/held-out by a hash of the rendered prompt, so every pair or row of a prompt lands on one side
(a prompt seen in training would flatter the held-out figures).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.clean import SPLIT_BUCKETS
from lora_pipeline.ml.data.formats import SHAREGPT_ROLES, _maybe_json, _text_of
from lora_pipeline.ml.data.templates import Template, with_single_eos

PREFERENCE_COLUMNS = ("chosen", "rejected")
UNPAIRED_COLUMNS = ("completion", "label")


def is_preference(frame: pd.DataFrame) -> bool:
    """Whether the rows are preference pairs (they have chosen and rejected)."""
    return set(PREFERENCE_COLUMNS) <= set(frame.columns)


def is_unpaired(frame: pd.DataFrame) -> bool:
    """Whether the rows are unpaired judgements for KTO (they have completion and label)."""
    return set(UNPAIRED_COLUMNS) <= set(frame.columns)


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


# Anthropic HH-RLHF writes each side as one transcript: "\n\nHuman: ...\n\nAssistant: ...".
_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript(text: str) -> list[dict] | None:
    """A Human/Assistant transcript as messages, or None when the text is not one."""
    if not text.lstrip("\n").startswith("Human: ") or "\n\nAssistant: " not in text:
        return None
    parts = _TRANSCRIPT_TURN.split(text.lstrip("\n"))
    return [{"role": _TRANSCRIPT_ROLES[role], "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _answer(value: Any, where: str, field: str) -> tuple[list[dict], dict]:
    """An answer field as (the messages before its last one, its last message): a conversation or one answer."""
    value = _maybe_json(value)
    if isinstance(value, str) and (transcript := _transcript(value)) is not None:
        value = transcript
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
            given = _messages(row["prompt"], at, "prompt")
            # Answers written as whole conversations repeat the prompt (UltraFeedback): it is not said twice.
            prompt = before_chosen if before_chosen[:len(given)] == given else given + before_chosen
        elif isinstance(row.get("instruction"), str):  # LLaMA-Factory's Alpaca ranking rows
            extra = row.get("input") if isinstance(row.get("input"), str) and row.get("input").strip() else ""
            prompt = [{"role": "user", "content": row["instruction"] + (f"\n{extra}" if extra else "")}] + before_chosen
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
        system = row.get("system") if isinstance(row.get("system"), str) and row.get("system").strip() else system_prompt
        if system and prompt[0]["role"] != "system":  # a row's own system column, else dataset.system_prompt
            prompt = [{"role": "system", "content": system}] + prompt
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


@dataclass(frozen=True)
class KTORow:
    """One unpaired row as messages: the prompt conversation, the answer, and whether the answer is desirable."""

    prompt: list[dict]
    completion: dict
    label: bool


def _label(value: Any, where: str) -> bool:
    """The label as raw_dataset's check reads it (formats.label_of: a bool, 0/1, true/false, yes/no)."""
    from lora_pipeline.ml.preference.formats import label_of, label_problem

    label = label_of(value.item() if isinstance(value, np.generic) else value)
    if label is None:
        raise DataError(f"{where}: field 'label' {label_problem(value)}")
    return label


def kto_rows_of(frame: pd.DataFrame, where: Callable[[int], str], system_prompt: str | None = None) -> list[KTORow]:
    """Every unpaired row as a KTORow; a DataError names the row and the field for the first that is not one.

    The prompt is the 'prompt' field (text, a message or messages) followed by any messages of 'completion'
    before its last one; without a 'prompt', a conversation in 'completion' carries it."""
    examples = []
    for index, row in enumerate(frame.to_dict("records")):
        at = where(index)
        before, completion = _answer(row["completion"], at, "completion")
        prompt = (_messages(row["prompt"], at, "prompt") if row.get("prompt") is not None else []) + before
        if not prompt:
            raise DataError(f"{at}: no prompt (a 'prompt' field, or a conversation in 'completion' before its answer)")
        if completion["role"] != "assistant":
            raise DataError(f"{at}: field 'completion' ends with a {completion['role']} message; it must be the answer")
        if not str(completion["content"]).strip():
            raise DataError(f"{at}: field 'completion' is empty")
        label = _label(row.get("label"), at)
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}] + prompt
        examples.append(KTORow(prompt, completion, label))
    return examples


def _render(tokenizer, template: Template, prompt: list[dict], answers: dict[str, dict], where: str,
            what: str) -> tuple[str, dict[str, str]]:
    """The rendered prompt (with its generation prompt) and each answer as the text the template adds after it."""
    def render(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, chat_template=template.jinja, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    try:
        prompt_text = render(prompt, generation_prompt=True)
        full = {field: render(prompt + [answer]) for field, answer in answers.items()}
    except Exception as exc:  # jinja2 errors and templates' raise_exception
        raise DataError(f"{where}: the {template.name} chat template cannot render this {what}: "
                        f"{str(exc).strip().splitlines()[0]}") from None
    for field, text in full.items():
        if not text.startswith(prompt_text):
            raise DataError(f"{where}: the {template.name} chat template renders the prompt differently "
                            f"once the '{field}' answer follows, so the answer cannot be located")
    eos = tokenizer.eos_token or ""
    return prompt_text, {field: with_single_eos(text[len(prompt_text):], eos) for field, text in full.items()}


def _tokenize_and_split(frame: pd.DataFrame, tokenizer, columns: tuple[str, ...], eval_fraction: float) -> None:
    """Add each text column's ids (no special tokens: the template wrote them) and the split by prompt hash."""
    from lora_pipeline.ml.data.clean import _hash64

    import pyarrow as pa

    for column in columns:
        frame[f"{column}_ids"] = [list(ids) for ids in
                                  tokenizer(list(frame[column]), add_special_tokens=False)["input_ids"]]
    hashes = _hash64(pa.array(frame["prompt"].map(lambda text: " ".join(text.split()).lower()), pa.string()))
    frame["content_hash"] = hashes.view(np.int64)
    frame["held_out"] = (hashes % SPLIT_BUCKETS) < round(eval_fraction * SPLIT_BUCKETS)


@dataclass
class PreferenceExamples:
    """Tokenized pairs: prompt ids and each answer's ids (completion only, ending in EOS), the texts, the split."""

    frame: pd.DataFrame  # prompt, chosen, rejected (texts), prompt_ids, chosen_ids, rejected_ids, content_hash, held_out
    too_long: int  # pairs whose prompt and longer answer pass max_length


def tokenize_pairs(pairs: list[Pair], tokenizer, template: Template, where: Callable[[int], str],
                   eval_fraction: float, max_length: int) -> PreferenceExamples:
    """Render each pair with the chat template and tokenize it; refuse a template that renders the prompt
    differently once an answer follows (the answer could not be located)."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for index, pair in enumerate(pairs):
        prompt, answers = _render(tokenizer, template, pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected},
                                  where(index), "pair")
        rows["prompt"].append(prompt)
        rows["chosen"].append(answers["chosen"])
        rows["rejected"].append(answers["rejected"])
    frame = pd.DataFrame(rows)
    _tokenize_and_split(frame, tokenizer, ("prompt", "chosen", "rejected"), eval_fraction)
    longest = frame["prompt_ids"].map(len) + np.maximum(frame["chosen_ids"].map(len), frame["rejected_ids"].map(len))
    return PreferenceExamples(frame=frame, too_long=int((longest > max_length).sum()))


@dataclass
class KTOExamples:
    """Tokenized unpaired rows: prompt ids, the answer's ids (ending in EOS), the label, the texts, the split."""

    frame: pd.DataFrame  # prompt, completion (texts), label, prompt_ids, completion_ids, content_hash, held_out
    too_long: int  # rows whose prompt and answer pass max_length


def tokenize_kto_rows(examples: list[KTORow], tokenizer, template: Template, where: Callable[[int], str],
                      eval_fraction: float, max_length: int) -> KTOExamples:
    """Render each unpaired row with the chat template and tokenize it, as tokenize_pairs does a pair."""
    rows = {"prompt": [], "completion": [], "label": []}
    for index, example in enumerate(examples):
        prompt, answers = _render(tokenizer, template, example.prompt, {"completion": example.completion},
                                  where(index), "row")
        rows["prompt"].append(prompt)
        rows["completion"].append(answers["completion"])
        rows["label"].append(example.label)
    frame = pd.DataFrame(rows).astype({"label": bool})
    _tokenize_and_split(frame, tokenizer, ("prompt", "completion"), eval_fraction)
    longest = frame["prompt_ids"].map(len) + frame["completion_ids"].map(len)
    return KTOExamples(frame=frame, too_long=int((longest > max_length).sum()))


def unpair(pairs: pd.DataFrame) -> pd.DataFrame:
    """Tokenized pairs as unpaired rows: each pair's chosen answer desirable, its rejected one not, one after
    the other; 'pair' numbers the pair a row came from, and the split stays the pair's."""
    keep = [column for column in ("prompt_ids", "content_hash", "held_out", "prompt") if column in pairs.columns]
    sides = []
    for side, label in (("chosen", True), ("rejected", False)):
        rows = pairs[keep].copy()
        rows["completion_ids"] = pairs[f"{side}_ids"].to_numpy()
        if side in pairs.columns:
            rows["completion"] = pairs[side].to_numpy()
        rows["label"] = label
        rows["pair"] = np.arange(len(pairs))
        sides.append(rows.reset_index(drop=True))
    both = pd.concat(sides, ignore_index=True)
    return both.sort_values(["pair", "label"], ascending=[True, False], kind="stable").reset_index(drop=True)
