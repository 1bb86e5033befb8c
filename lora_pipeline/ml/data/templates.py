"""Prompt templates: which one applies, and rendering rows to text with the spans the loss is taken on.

Dagster-free. A rendered example is its full text (ending in exactly one EOS) and the character
spans of the tokens to train on: the response for single-turn rows, every assistant turn (with the
template's end-of-turn marker) for conversations, everything for plain text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lora_pipeline.errors import ConfigError, DataError
from lora_pipeline.ml.data.formats import LEARN, REASONING, THINK_CLOSE, THINK_OPEN

NAMED_TEMPLATES = ("auto", "alpaca", "chatml", "tokenizer", "plain")

# ChatML (the OpenAI/Qwen/Hermes convention), with tool schemas in the system turn and tool calls
# as <tool_call> JSON, so conversations with function calls render on any tokenizer.
CHATML = (
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{ '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message.role == 'system') %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{%- if message.content or not loop.first %}{{ '\\n' }}{%- endif %}"
    "{{ '<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Template:
    """A resolved template: its name (as recorded in metadata) and, for chat templates, the Jinja source."""

    name: str
    jinja: str | None = None

    @property
    def is_chat(self) -> bool:
        return self.jinja is not None

    @property
    def renders_reasoning(self) -> bool:
        """Whether the template has a field for reasoning (Qwen3's reasoning_content) rather than none."""
        return self.jinja is not None and REASONING in self.jinja


def resolve_template(setting: str, fmt: str, tokenizer_template: str | None) -> Template:
    """The template for a dataset.template setting, the rows' format and the tokenizer's own chat template."""
    setting = setting.strip()
    if "{{" in setting or "{%" in setting:
        return Template("inline", setting)
    if setting not in NAMED_TEMPLATES:
        raise ConfigError(
            f"dataset.template: unknown template {setting!r} (use one of {', '.join(NAMED_TEMPLATES)} "
            "or an inline Jinja chat template)"
        )
    if setting == "auto":
        if fmt == "alpaca":
            return Template("alpaca")
        if fmt in ("prompt_completion", "text"):
            return Template("plain")
        return Template("tokenizer", tokenizer_template) if tokenizer_template else Template("chatml", CHATML)
    if setting == "tokenizer":
        if not tokenizer_template:
            raise ConfigError(
                "dataset.template: 'tokenizer' asks for the tokenizer's own chat template, but this "
                "tokenizer has none; use 'chatml' or an inline Jinja template"
            )
        return Template("tokenizer", tokenizer_template)
    if setting == "chatml":
        return Template("chatml", CHATML)
    if setting == "alpaca" and fmt != "alpaca":
        raise ConfigError(f"dataset.template: 'alpaca' needs alpaca rows; these rows are {fmt} "
                          "(use 'auto', 'chatml', 'tokenizer' or a Jinja template)")
    if setting == "plain" and fmt not in ("prompt_completion", "text", "alpaca"):
        raise ConfigError(f"dataset.template: 'plain' needs prompt_completion or text rows; these rows are {fmt}")
    return Template(setting)


def with_single_eos(text: str, eos_token: str) -> str:
    """The text with trailing whitespace and EOS tokens removed, then exactly one EOS appended."""
    stripped = text.rstrip()
    while eos_token and stripped.endswith(eos_token):
        stripped = stripped[: -len(eos_token)].rstrip()
    return stripped + eos_token


def alpaca_prompt(instruction: str, input_text: str, system: str | None = None) -> str:
    """The Alpaca prompt, ending where the response begins; a system prompt, if any, comes first."""
    preamble = f"{system.strip()}\n\n" if system and system.strip() else ""
    if input_text and input_text.strip():
        return f"{preamble}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{preamble}### Instruction:\n{instruction}\n\n### Response:\n"


TURNS = ("auto", "conversation", "per_turn")
REASONING_POLICIES = ("auto", "inline", "drop")
UNRENDERABLE_POLICIES = ("refuse", "drop")


@dataclass
class Rendered:
    """Rendered examples: full text, the trained character spans, and prompt/completion for previews and samples.

    Chat rows can give several examples each (one per learned turn, see render_chats) or none (a row
    the template cannot render, dropped): rows then says which row (of the whole dataset) each
    example came from, per_turn whether it is one of several examples of its row, and dropped the
    rows left out with why.
    """

    text: list[str]
    spans: list[list[tuple[int, int]]] | None  # None: one span, from len(prompt) to the end
    prompt: list[str]
    completion: list[str]
    rows: "np.ndarray | None" = None  # int64 per example; None: example i is row i
    per_turn: "np.ndarray | None" = None  # bool per example
    dropped: list[tuple[int, str]] = field(default_factory=list)


def render_single_turn(prompts: list[str], responses: list[str], eos_token: str) -> Rendered:
    """Prompt + response + one EOS; the loss span is the response with its EOS."""
    completions = [with_single_eos(response, eos_token) for response in responses]
    return Rendered(
        text=[p + c for p, c in zip(prompts, completions)], spans=None, prompt=prompts, completion=completions
    )


@dataclass(frozen=True)
class ChatPolicy:
    """How conversations meet a template: dataset.turns, dataset.reasoning and dataset.unrenderable."""

    turns: str = "auto"
    reasoning: str = "auto"
    unrenderable: str = "refuse"


class Unrenderable(Exception):
    """A row the template cannot render as it will be used: the reason, and what to do instead."""


def render_chats(
    tokenizer,
    template: Template,
    chats: list[list[dict]],
    tools: list[list[dict] | None],
    where,
    policy: ChatPolicy = ChatPolicy(),
    first_row: int = 0,
) -> Rendered:
    """Render each chat with the Jinja template; every learned turn, through its end-of-turn marker, is a span.

    Learned turns are the assistant turns, unless a turn's training flag (LEARN, from the data's
    loss_weight / train / weight field) says otherwise: 0 makes an assistant turn context only, 1
    makes any turn learned. An assistant turn's span runs from the end of the conversation rendered
    up to it with the generation prompt to the end of the conversation rendered through it (less the
    whitespace templates put between turns), so it covers exactly what the model has to produce.

    A template that renders history as it renders the last turn (ChatML, Llama 3) gives one example
    per conversation. One that does not (Qwen3 keeps reasoning and an empty think block only on the
    last answer) cannot show every turn as inference will in one sequence: each learned turn is then
    an example of its own, the history before it rendered as history (policy.turns 'auto' chooses
    per row; 'conversation' refuses such rows, 'per_turn' splits every conversation).

    A row the template cannot render (a role it refuses, tool calls it leaves out) is refused with
    its row, or with policy.unrenderable 'drop' left out and listed in Rendered.dropped.
    """
    eos = tokenizer.eos_token or ""
    rendered = Rendered(text=[], spans=[], prompt=[], completion=[])
    rows, per_turn = [], []
    for index, chat in enumerate(chats):
        learned = [is_learned(message) for message in chat]
        chat = [as_template_sees(message, policy.reasoning, template.renders_reasoning)
                for message in chat[: last_learned(learned) + 1]]
        try:
            examples = _chat_examples(tokenizer, template, chat, learned, tools[index], policy.turns)
        except Unrenderable as problem:
            if policy.unrenderable == "drop":
                rendered.dropped.append((first_row + index, str(problem)))
                continue
            raise DataError(f"{where(index)}: {problem}") from None
        for text, row_spans in examples:
            text = with_single_eos(text, eos)
            if row_spans:
                # The final EOS belongs to the last answer; trailing whitespace trimmed by with_single_eos is gone.
                last_start = min(row_spans[-1][0], len(text))
                row_spans = [(a, min(b, len(text))) for a, b in row_spans[:-1]] + [(last_start, len(text))]
            rendered.text.append(text)
            rendered.spans.append(row_spans)
            rendered.prompt.append(text[: row_spans[-1][0]] if row_spans else text)
            rendered.completion.append(text[row_spans[-1][0]:] if row_spans else "")
            rows.append(first_row + index)
            per_turn.append(len(examples) > 1)
    rendered.rows = np.array(rows, dtype=np.int64)
    rendered.per_turn = np.array(per_turn, dtype=bool)
    return rendered


def _chat_examples(tokenizer, template: Template, chat: list[dict], learned: list[bool], tools,
                   turns: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """The examples of one conversation: (text, learned character spans) each; Unrenderable if none can be made."""
    try:
        return _examples_in(tokenizer, template, chat, learned, tools, turns)
    except _ToolCallsLeftOut as left_out:
        raise Unrenderable(
            f"the {template.name} chat template leaves out the tool call(s) {left_out}, so what the model "
            "would learn is not what it must produce; use a template that renders tool calls "
            "(dataset.template: chatml, or an inline one) or dataset.unrenderable: drop") from None


def _examples_in(tokenizer, template: Template, chat: list[dict], learned: list[bool], tools,
                 turns: str) -> list[tuple[str, list[tuple[int, int]]]]:
    def render(messages, generation_prompt=False) -> str:
        if not messages:
            return ""
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template.jinja,
                                                 tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 errors and templates' raise_exception
            raise Unrenderable(f"the {template.name} chat template cannot render this conversation: "
                               f"{str(exc).strip().splitlines()[0]}; use another template (dataset.template: "
                               "chatml, or an inline one) or dataset.unrenderable: drop") from None

    def turn_span(turn: int) -> tuple[str, str]:
        """The conversation rendered up to the turn (as its prompt) and through it."""
        before = render(chat[:turn], generation_prompt=chat[turn]["role"] == "assistant")
        through = render(chat[: turn + 1])
        if not through.startswith(before):
            raise Unrenderable(f"the {template.name} chat template renders turn {turn}'s prompt differently "
                               "from its generation prompt, so the turn cannot be located; use another template "
                               "or set training.completion_only_loss: false")
        return before, through

    learned_turns = [turn for turn in range(len(chat)) if learned[turn]]
    full = render(chat)
    located = [turn_span(turn) for turn in learned_turns]  # each turn rendered as its own last turn
    if turns != "per_turn":
        if all(full.startswith(through) for _, through in located):
            _require_tool_calls(chat, full, render)
            return [(full, [(len(before), _turn_end(before, through)) for before, through in located])]
        if turns == "conversation":
            raise Unrenderable(f"the {template.name} chat template renders earlier turns differently once "
                               "later turns follow, so one sequence cannot show every turn as inference will; "
                               "set dataset.turns: auto (one example per learned turn) or use another template")
    examples = []
    for turn, (before, through) in zip(learned_turns, located):
        _require_tool_calls(chat[: turn + 1], through, render)
        examples.append((through, [(len(before), _turn_end(before, through))]))
    return examples or [(full, [])]


def _turn_end(before: str, through: str) -> int:
    """Where a turn's learned text ends: its end-of-turn marker, not the whitespace templates put between turns."""
    return max(len(before), len(through.rstrip()))


class _ToolCallsLeftOut(Exception):
    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _require_tool_calls(chat: list[dict], text: str, render) -> None:
    """Every tool call's function name must be in the text rendered from its turn on: some templates
    silently drop calls (and the tool schemas before the turns name the functions already)."""
    first = next((index for index, message in enumerate(chat) if message.get("tool_calls")), None)
    if first is None:
        return
    before = render(chat[:first])
    after = text[len(before):] if text.startswith(before) else text
    missing = [call["function"]["name"] for message in chat[first:] for call in message.get("tool_calls") or ()
               if call["function"]["name"] not in after]
    if missing:
        raise _ToolCallsLeftOut(missing)


def as_template_sees(message: dict, reasoning: str, renders_reasoning: bool) -> dict:
    """The message as templates see it: our training flag removed, its reasoning where the policy puts it.

    reasoning 'auto' hands it to a template that renders reasoning_content and writes it inline (a
    think block before the answer) for one that does not; 'inline' always writes it inline; 'drop'
    leaves it out."""
    message = {key: value for key, value in message.items() if key != LEARN}
    thought = message.get(REASONING)
    if thought is None:
        return message
    if reasoning == "auto" and renders_reasoning:
        return message
    del message[REASONING]
    if reasoning != "drop":
        message["content"] = f"{THINK_OPEN}\n{thought.strip()}\n{THINK_CLOSE}\n\n{message['content'] or ''}"
    return message


def is_learned(message: dict) -> bool:
    flag = message.get(LEARN)
    return message["role"] == "assistant" if flag is None else flag


def last_learned(flags: list[bool]) -> int:
    """Index of the last True, or -1: turns after the last learned one teach nothing and are left out."""
    return max((i for i, flag in enumerate(flags) if flag), default=-1)
