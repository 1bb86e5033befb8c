"""A conversation with trained adapters on one loaded base: the session `chat` keeps and `generate` asks once.

Dagster-free; torch is imported when a model answers. The base is loaded once and every adapter
attached to it with PEFT (adapters.attach_adapters), so switching is set_adapter (the bare base:
disable_adapter) and costs nothing. The conversation is kept as plain messages and rendered again
for every answer through the answering adapter's own tokenizer and the template its training
rendered the data with (adapters.conversation_ids), so each adapter reads the same history the way
it learned to. The bare base and blends, which have no training of their own, are asked as the
first adapter is: a comparison then differs only in the weights.

Decoding is greedy (reproducible) unless a temperature is set, and stops at the tokenizer's EOS,
the token training put after every answer. An answer can be streamed: a callback gets each new
piece of text as the tokens come, and the pieces add up to the answer returned.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_pipeline.ml.adapters import (
    Blend,
    PromptStyle,
    add_blend,
    adapter_name,
    attach_adapters,
    conversation_ids,
    using,
)

if TYPE_CHECKING:
    from lora_pipeline.ml.base.precision import DeviceInfo

BASE = "base"  # the bare base's name among the adapters
Stream = Callable[[str], None]  # gets each new piece of an answer's text


class UnknownModel(ValueError):
    """A name that is neither the base nor an adapter or blend of the session; says which are, and the closest."""

    def __init__(self, name: str, names: list[str]):
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown model {name!r}{hint} (choose from: {', '.join(names)})")


class BlendRefused(ValueError):
    """A blend that PEFT would refuse or, worse, make wrong without a word (adapters.check_blend says which)."""


class ChatSession:
    """The base with every adapter (and blend) attached, the conversation so far and which model answers it.

    model: the PeftModel with every adapter attached (load makes it); tokenizers and styles: each adapter's
    (keyed by model key), the first adapter's for the base and blends; blends: each blend's PEFT name.
    names: "base", the adapters in the order given, then the blends; active: the one answering (the
    first adapter unless named). history: the user and assistant messages so far, the same for every
    model. system: a system prompt for every model, replacing the one each was trained with (None:
    each its own).
    """

    def __init__(self, model, tokenizers: dict, styles: dict[str, PromptStyle], blends: dict[str, str] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, active: str | None = None):
        self.model = model
        self.tokenizers = tokenizers
        self.styles = styles
        self.adapters = list(tokenizers)
        self.blends = dict(blends or {})  # the blend's name -> its PEFT adapter's
        self.names = [BASE, *self.adapters, *self.blends]
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.history: list[dict] = []
        self.system: str | None = None
        self.active = self.adapters[0]
        if active is not None:
            self.use(active)

    @classmethod
    def load(cls, base_dir: Path, adapters: dict[str, Path], styles: dict[str, PromptStyle], device: "DeviceInfo",
             trust_remote_code: bool = False, blends: "tuple[Blend, ...] | list[Blend]" = (),
             active: str | None = None, **settings) -> "ChatSession":
        """Load the base once and attach every adapter (keyed by model, each folder with its tokenizer) and blend.

        Everything that can be refused without the model is refused before it loads (a minute on a
        CPU): a model named 'base', an active name that is none of them, a thinking switch the
        template lacks. settings: max_new_tokens and temperature.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lora_pipeline.ml.base.precision import device_map_for

        if BASE in adapters or any(blend.name == BASE for blend in blends):
            raise ValueError("a model named 'base' would hide the base's own answer; rename it")
        missing = [name for name in adapters if name not in styles]
        if missing:
            raise ValueError(f"no prompt style for adapter {missing[0]!r}")
        names = [BASE, *adapters, *(blend.name for blend in blends)]
        if active is not None and active not in names:
            raise UnknownModel(active, names)
        tokenizers = {name: AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
                      for name, path in adapters.items()}
        for name in adapters:  # a thinking switch the template lacks raises NoThinkingSwitch here
            conversation_ids(tokenizers[name], [{"role": "user", "content": "Hi"}], styles[name])
        base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map_for(device),
                                                    trust_remote_code=trust_remote_code)
        model = attach_adapters(base, {adapter_name(name): path for name, path in adapters.items()}).eval()
        blended = {}
        for blend in blends:
            safe = Blend(adapter_name(blend.name), tuple(adapter_name(a) for a in blend.adapters), blend.weights,
                         blend.combination, blend.density)
            try:
                blended[blend.name] = add_blend(model, safe)
            except ValueError as refused:
                raise BlendRefused(str(refused)) from None
        return cls(model, tokenizers, styles, blended, active=active, **settings)

    def kind(self, name: str) -> str:
        """'base', 'adapter' or 'blend'."""
        return BASE if name == BASE else "blend" if name in self.blends else "adapter"

    def use(self, name: str) -> None:
        """Answer with `name` from now on; UnknownModel (listing the names, the closest first) if there is none."""
        if name not in self.names:
            raise UnknownModel(name, self.names)
        self.active = name

    def reset(self) -> int:
        """Forget the conversation; returns how many user turns it had."""
        turns = sum(message["role"] == "user" for message in self.history)
        self.history = []
        return turns

    def reply(self, text: str, name: str | None = None, stream: Stream | None = None) -> str:
        """Answer a user turn after the conversation so far (with the active model unless named); both are kept.

        The conversation changes only once the answer is complete: an interrupted or failed turn leaves it as
        it was."""
        asked = [*self.history, {"role": "user", "content": text}]
        answer = self.answer(name or self.active, asked, stream)
        self.history = [*asked, self.assistant_message(answer)]
        return answer

    def compare(self, text: str | None = None,
                stream: "Callable[[str], Stream | None] | None" = None) -> dict[str, str]:
        """Every model's answer on the same history: to the last user turn (text None) or to a new one.

        The conversation is unchanged by the former; a new turn is kept with the active model's answer.
        stream: called with each model's name before it answers, returns that answer's callback (or None).
        """
        if text is None:
            last = max((i for i, message in enumerate(self.history) if message["role"] == "user"), default=None)
            if last is None:
                raise ValueError("there is no message to compare answers to yet")
            asked = self.history[: last + 1]
        else:
            asked = [*self.history, {"role": "user", "content": text}]
        answers = {name: self.answer(name, asked, None if stream is None else stream(name)) for name in self.names}
        if text is not None:
            self.history = [*asked, self.assistant_message(answers[self.active])]
        return answers

    def answer(self, name: str, messages: list[dict], stream: Stream | None = None) -> str:
        """Model `name`'s answer to the messages (the last a user's), streamed to `stream` if given; keeps nothing."""
        import torch

        from lora_pipeline.ml.batches import pad_id_of

        tokenizer = self.tokenizers[self._asker(name)]
        ids = self.prompt_ids(name, messages)
        device = next(self.model.parameters()).device
        greedy = self.temperature == 0
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": self.temperature}
        with using(self.model, self._peft_name(name)), torch.no_grad():
            generated = self.model.generate(
                input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens=self.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id_of(tokenizer), streamer=None if stream is None else TextPieces(tokenizer, stream),
                **sampling,
            )
        return tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True).strip()

    def prompt_ids(self, name: str, messages: list[dict] | None = None) -> list[int]:
        """The ids model `name` is given for the messages (default: the conversation so far), as its training put them.

        Each message is first put as training put a row's (adapters' data settings: reasoning handed to a
        template that renders reasoning_content, written inline for one that does not, or dropped).
        """
        from lora_pipeline.ml.data.templates import as_template_sees, resolve_template

        if name not in self.names:
            raise UnknownModel(name, self.names)
        asker = self._asker(name)
        tokenizer, style = self.tokenizers[asker], self.styles[asker]
        if self.system is not None:
            style = dataclasses.replace(style, system_prompt=self.system)
        renders_reasoning = resolve_template(style.template, style.format, tokenizer.chat_template).renders_reasoning
        seen = [as_template_sees(message, style.reasoning, renders_reasoning)
                for message in (self.history if messages is None else messages)]
        return conversation_ids(tokenizer, seen, style)

    @staticmethod
    def assistant_message(answer: str) -> dict:
        """An answer as the conversation keeps it: a leading think block apart, as reasoning_content, which is what
        thinking templates (Qwen3's) read and drop from earlier turns; prompt_ids puts it as each template expects."""
        from lora_pipeline.ml.data.formats import REASONING, split_think

        reasoning, content = split_think(answer)
        if reasoning is None:
            return {"role": "assistant", "content": answer}
        return {"role": "assistant", "content": content, REASONING: reasoning}

    def _asker(self, name: str) -> str:
        """Whose tokenizer and prompt style a model is asked with: an adapter's own, the first's for base and blends."""
        return name if name in self.tokenizers else self.adapters[0]

    def _peft_name(self, name: str) -> str | None:
        if name == BASE:
            return None
        return self.blends.get(name) or adapter_name(name)


class TextPieces:
    """transformers' streamer interface (put, end) turning generated ids into pieces of text for a callback.

    The answer is decoded whole at every token, as a token's text can depend on the next ones (a
    character split over byte tokens, SentencePiece's leading spaces): text ending in an incomplete
    character waits for the rest, and whitespace at either end is held back, so that the pieces add
    up to the stripped answer ChatSession.answer returns.
    """

    def __init__(self, tokenizer, callback: Stream):
        self.tokenizer = tokenizer
        self.callback = callback
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.ids += [int(token) for token in value.reshape(-1).tolist()]
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not text.endswith("\ufffd"):
            self._send(text.rstrip())

    def end(self) -> None:
        self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True).strip())

    def _send(self, text: str) -> None:
        piece = text[self.sent:]
        if piece:
            self.sent = len(text)
            self.callback(piece)
