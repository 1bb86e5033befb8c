"""Template fidelity: every hand-off puts a held-out conversation into the ids training rendered it as.

Dagster-free. A hand-off is anything that turns a conversation into prompt ids for the trained
model: transformers loading the merged folder or the adapter folder, and the chat template the
serving files pass to vLLM. Each gets the conversation as messages (the history up to the last
learned answer, with the tools) and must produce exactly the ids of the prompt the training data
held for it; where they differ, the first difference is shown in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from lora_pipeline.ml.data.clean import clean_rows
from lora_pipeline.ml.data.formats import conversations_of, tools_of
from lora_pipeline.ml.data.raw import LoadedDataset
from lora_pipeline.ml.data.templates import ChatPolicy, Template, as_template_sees, is_learned, last_learned

PromptIds = Callable[[list[dict], "list[dict] | None"], list[int]]
MAX_CONVERSATIONS = 32


@dataclass(frozen=True)
class HeldOutPrompt:
    """A held-out conversation up to its last learned answer, and the prompt ids training rendered for it."""

    messages: list[dict]
    tools: list[dict] | None
    ids: list[int]


@dataclass(frozen=True)
class HandoffFidelity:
    """One hand-off's result: how many prompts were checked, how many came out as in training, the first miss."""

    handoff: str
    checked: int
    equal: int
    first_difference: str | None = None

    @property
    def passed(self) -> bool:
        return self.checked > 0 and self.equal == self.checked


def held_out_prompts(loaded: LoadedDataset, eval_split: pd.DataFrame, tokenizer, template: Template, dedupe: str,
                     policy: ChatPolicy, system_prompt: str | None, flag_field: str | None,
                     limit: int = MAX_CONVERSATIONS) -> tuple[list[HeldOutPrompt], str | None]:
    """Up to limit held-out conversations with the prompt ids of their last learned answer as training had them.

    The rows are found by content hash (the split's key); a row's last example is the one whose
    prompt leads to its last learned answer. Returns the prompts and, when some rows cannot be
    checked, why (Alpaca rows with an input: a chat message has no input field to carry it)."""
    if loaded.format == "text":
        return [], "plain text has no prompt to format"
    cleaned = clean_rows(loaded, dedupe)
    wanted = eval_split["content_hash"].to_numpy().view(np.uint64)
    last_example = {int(key): index for index, key in enumerate(wanted)}  # later examples of a row win
    rows = list(np.flatnonzero(np.isin(cleaned.hashes, wanted)))
    skipped = None
    if loaded.format == "alpaca" and "input" in cleaned.frame.columns:  # row numbers are the cleaned rows'
        inputs = cleaned.frame["input"].fillna("").astype(str).str.strip().to_numpy()
        with_input = [row for row in rows if inputs[row]]
        rows = [row for row in rows if not inputs[row]]
        if with_input:
            skipped = f"{len(with_input)} held-out Alpaca rows with an input are not checked (a chat has no input field)"
    rows = rows[:limit]
    frame = cleaned.frame.iloc[rows]
    chats = conversations_of(frame, loaded.format, system_prompt, flag_field)
    prompts = []
    for row, chat, tools in zip(rows, chats, tools_of(frame)):
        last = last_learned([is_learned(message) for message in chat])
        if last < 0:
            continue
        example = eval_split.iloc[last_example[int(cleaned.hashes[row])]]
        # Text without a chat template was tokenized with the tokenizer's special tokens (formatted.py).
        prompt_ids = tokenizer(example["prompt"], add_special_tokens=not template.is_chat)["input_ids"]
        stored = [int(token) for token in example["input_ids"][: len(prompt_ids)]]
        if prompt_ids != stored:
            continue  # a prompt that does not end on a token boundary: no prompt ids of its own to compare with
        messages = [as_template_sees(message, policy.reasoning, template.renders_reasoning) for message in chat[:last]]
        prompts.append(HeldOutPrompt(messages, tools, stored))
    return prompts, skipped


def check_handoff(name: str, prompt_ids: PromptIds, prompts: list[HeldOutPrompt], tokenizer) -> HandoffFidelity:
    """How many held-out prompts the hand-off turns into the training ids, and the first it does not."""
    equal, first = 0, None
    for prompt in prompts:
        try:
            ids = prompt_ids(prompt.messages, prompt.tools)
        except Exception as exc:  # a template that cannot render what training rendered is a miss, with why
            ids, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if ids == prompt.ids:
            equal += 1
        elif first is None:
            first = error if ids is None else _first_difference(ids, prompt.ids, tokenizer)
    return HandoffFidelity(name, len(prompts), equal, first)


def _first_difference(got: list[int], expected: list[int], tokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))

    def around(ids):
        return repr(tokenizer.decode(ids[max(0, at - 3): at + 4]))

    return (f"token {at} of {len(expected)}: {around(got)} instead of {around(expected)} "
            f"({len(got)} ids instead of {len(expected)})")


def chat_template_ids(tokenizer, chat_template: str | None = None) -> PromptIds:
    """A hand-off that renders with the tokenizer's chat template (or the given one) and tokenizes the text
    without adding special tokens, as transformers' apply_chat_template and vLLM's chat endpoint do."""

    def prompt_ids(messages, tools):
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return prompt_ids


def folder_ids(model_dir, trust_remote_code: bool = False) -> PromptIds:
    """The hand-off of a saved folder: its tokenizer and the chat template saved with it, as a user loads it."""
    from transformers import AutoTokenizer

    return saved_tokenizer_ids(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code), model_dir)


def saved_tokenizer_ids(tokenizer, model_dir) -> PromptIds:
    """The hand-off of a tokenizer loaded from model_dir, with the chat template it was saved with (if any)."""
    if tokenizer.chat_template is None:
        def no_template(messages, tools):
            raise ValueError(f"{model_dir} has no chat template")
        return no_template
    return chat_template_ids(tokenizer)
