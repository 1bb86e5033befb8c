"""Prompt templates: which one applies, and rendering rows to text with the spans the loss is taken on.

Dagster-free. A rendered example is its full text (ending in exactly one EOS) and the character
spans of the tokens to train on: the response for single-turn rows, every assistant turn (with the
template's end-of-turn marker) for conversations, everything for plain text.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_pipeline.errors import ConfigError, DataError
from lora_pipeline.ml.data.formats import LEARN

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


@dataclass
class Rendered:
    """Rendered examples: full text, the trained character spans, and prompt/completion for previews and samples."""

    text: list[str]
    spans: list[list[tuple[int, int]]] | None  # None: one span, from len(prompt) to the end
    prompt: list[str]
    completion: list[str]


def render_single_turn(prompts: list[str], responses: list[str], eos_token: str) -> Rendered:
    """Prompt + response + one EOS; the loss span is the response with its EOS."""
    completions = [with_single_eos(response, eos_token) for response in responses]
    return Rendered(
        text=[p + c for p, c in zip(prompts, completions)], spans=None, prompt=prompts, completion=completions
    )


def render_chats(
    tokenizer,
    template: Template,
    chats: list[list[dict]],
    tools: list[list[dict] | None],
    where,
) -> Rendered:
    """Render each chat with the Jinja template; every learned turn, through its end-of-turn marker, is a span.

    Learned turns are the assistant turns, unless a turn's training flag (LEARN, from the data's
    loss_weight / train / weight field) says otherwise: 0 makes an assistant turn context only, 1
    makes any turn learned. An assistant turn's span runs from the end of the conversation rendered
    up to it with the generation prompt to the end of the conversation rendered through it, so it
    covers exactly what the model has to produce, whatever the template; another learned turn's span
    is the whole turn as rendered.
    """
    eos = tokenizer.eos_token or ""
    texts, spans, prompts, completions = [], [], [], []

    def render(messages, index, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages,
                tools=tools[index],
                chat_template=template.jinja,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as exc:  # jinja2 errors and templates' raise_exception
            raise DataError(f"{where(index)}: the {template.name} chat template cannot render this "
                            f"conversation: {str(exc).strip().splitlines()[0]}") from None

    for index, chat in enumerate(chats):
        learned = [_is_learned(message) for message in chat]
        chat = [_without_flag(message) for message in chat[: _last_true(learned) + 1]]
        full = render(chat, index) if chat else ""
        row_spans = []
        for turn, message in enumerate(chat):
            if not learned[turn]:
                continue
            before = render(chat[:turn], index, generation_prompt=message["role"] == "assistant")
            through = render(chat[: turn + 1], index)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{where(index)}: the {template.name} chat template renders earlier turns differently "
                    "once later turns follow, so the assistant turns cannot be located; use another "
                    "template or set training.completion_only_loss: false"
                )
            row_spans.append((len(before), len(through)))
        text = with_single_eos(full, eos)
        if row_spans:
            # The final EOS belongs to the last answer; trailing whitespace trimmed by with_single_eos is gone.
            last_start = min(row_spans[-1][0], len(text))
            row_spans = [(a, min(b, len(text))) for a, b in row_spans[:-1]] + [(last_start, len(text))]
        texts.append(text)
        spans.append(row_spans)
        prompts.append(text[: row_spans[-1][0]] if row_spans else text)
        completions.append(text[row_spans[-1][0]:] if row_spans else "")
    return Rendered(text=texts, spans=spans, prompt=prompts, completion=completions)


def _is_learned(message: dict) -> bool:
    flag = message.get(LEARN)
    return message["role"] == "assistant" if flag is None else flag


def _last_true(flags: list[bool]) -> int:
    """Index of the last True, or -1: turns after the last learned one teach nothing and are left out."""
    return max((i for i, flag in enumerate(flags) if flag), default=-1)


def _without_flag(message: dict) -> dict:
    """The message as templates see it (the flag is ours, not a field they know)."""
    return message if LEARN not in message else {key: value for key, value in message.items() if key != LEARN}
