"""One prompt format from training to every hand-off. Dagster-free; no torch.

The template that rendered the training data is part of the model: it is written into the adapter's
(and so the merged model's) tokenizer as its chat template, so that transformers, vLLM, llama.cpp's
converter and Ollama all put a conversation the way training did. Rows trained without a chat
template (Alpaca, prompt/completion) get the Jinja equivalent of what formatting wrote, so a chat
request to a server still lands on the trained format. The end-of-turn token learned after every
answer is among the generation config's EOS ids, so generation stops where training stopped.
"""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.ml.data.templates import Template, resolve_template

# What alpaca_prompt and with_single_eos write, as a chat template: a system prompt first, the user's
# message as the instruction (a chat request has no separate input), the answer closed by EOS.
_ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{{ message.content | trim }}{{ '\\n\\n' }}"
    "{%- elif message.role == 'user' -%}{{ '### Instruction:\\n' + message.content + '\\n\\n### Response:\\n' }}"
    "{%- elif message.role == 'assistant' -%}{{ message.content + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# prompt_completion and text rows: the prompt as it is, the completion after it.
_PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}{{ message.content + eos_token }}"
    "{%- elif message.role == 'user' -%}{{ message.content }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first when asked for special tokens (what non-chat formatting did)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def prompt_template(template: Template, fmt: str, tokenizer) -> str:
    """The Jinja chat template that renders a conversation as training rendered its rows.

    Chat templates are themselves; the Alpaca and plain formats get their Jinja equivalent, led by
    BOS where the tokenizer added one in training (a chat template's text is tokenized without
    special tokens, by transformers and by servers alike)."""
    if template.is_chat:
        return template.jinja
    body = _ALPACA if template.name == "alpaca" else _PLAIN
    return ("{{ bos_token }}" if adds_bos(tokenizer) else "") + body


def training_template(dataset_template: str, fmt: str, tokenizer) -> str:
    """prompt_template for a dataset.template setting and the rows' recorded format."""
    return prompt_template(resolve_template(dataset_template, fmt, tokenizer.chat_template), fmt, tokenizer)


def record_prompt_format(model_dir: Path, dataset_template: str, fmt: str, trust_remote_code: bool = False) -> str:
    """Write the training template into the tokenizer saved in model_dir (an adapter folder); return it.

    transformers saves it as chat_template.jinja beside tokenizer_config.json, where it and the
    servers that load tokenizers with it read it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer.chat_template = training_template(dataset_template, fmt, tokenizer)
    tokenizer.save_pretrained(model_dir)
    return tokenizer.chat_template


def stop_token_ids(generation_eos, tokenizer) -> list[int]:
    """The generation config's EOS ids with the tokenizer's EOS (the token learned after every answer) added."""
    ids = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) else list(generation_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
