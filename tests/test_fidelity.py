"""Template fidelity: the template that rendered the training data travels with the model, and the gate
that proves each hand-off gives the training prompt ids catches one that does not."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import dataset_settings, format_rows
from lora_pipeline.ml.base.families import tokenizer_dir
from lora_pipeline.ml.data.clean import clean_rows
from lora_pipeline.ml.data.raw import load_dataset
from lora_pipeline.ml.data.templates import CHATML, ChatPolicy, resolve_template
from lora_pipeline.ml.fidelity import chat_template_ids, check_handoff, folder_ids, held_out_prompts
from lora_pipeline.ml.promotion import template_fidelity
from lora_pipeline.ml.prompt_format import record_prompt_format


OTHER = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"


def _rows(count: int) -> list[dict]:
    return [{"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"What is {i} times 3?"},
        {"role": "assistant", "content": f"<think>\n{i} threes\n</think>\n\n{3 * i}."},
        {"role": "user", "content": "And plus one?"},
        {"role": "assistant", "content": f"{3 * i + 1}."},
    ]} for i in range(count)]


def _prompts(tokenizer, path, template_setting: str):
    settings = dataset_settings(source=str(path), template=template_setting)
    formatted = format_rows(tokenizer, settings, eval_fraction=0.3, max_length=4096, template=template_setting)
    loaded = load_dataset(settings)
    template = resolve_template(template_setting, loaded.format, tokenizer.chat_template)
    prompts, not_checked = held_out_prompts(loaded, formatted.eval.to_pandas(), tokenizer, template, "normalized",
                                            ChatPolicy(), None, None)
    return prompts, not_checked


@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma3", "deepseek-v3"])
def test_the_tokenizers_own_template_hands_off_the_training_ids_and_another_template_is_caught(tmp_path, family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(40)))
    prompts, not_checked = _prompts(tokenizer, path, "tokenizer")
    assert len(prompts) >= 5 and not_checked is None
    same = check_handoff("own", chat_template_ids(tokenizer), prompts, tokenizer)
    assert same.passed and same.equal == same.checked == len(prompts)
    # A server that formats with another template is caught, with where the ids part.
    other = check_handoff("server", chat_template_ids(tokenizer, OTHER), prompts, tokenizer)
    assert not other.passed and other.equal == 0 and other.first_difference.startswith("token ")
    gate = template_fidelity([same, other], None)
    assert not gate.passed and "server put prompts differently from training" in gate.detail


def test_a_saved_adapter_carries_the_template_the_data_was_rendered_with(tmp_path):
    """ChatML on Llama 3's tokenizer: the folder's own template would be Llama 3's; the recorded one is ChatML."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("llama3"))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(40)))
    prompts, _ = _prompts(tokenizer, path, "chatml")
    folder = tmp_path / "adapter"
    tokenizer.save_pretrained(folder)
    before = check_handoff("folder", folder_ids(folder), prompts, tokenizer)
    assert not before.passed  # the folder as a plain save_pretrained leaves it: Llama 3's own template
    assert record_prompt_format(folder, "chatml", "messages") == CHATML
    after = check_handoff("folder", folder_ids(folder), prompts, tokenizer)
    assert after.passed and after.checked == len(prompts)


def test_alpaca_rows_hand_off_through_the_jinja_equivalent_of_the_alpaca_prompt(tmp_path, micro_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    rows = [{"instruction": f"Spell {i}", "input": "" if i % 3 else f"as words {i}", "output": f"number {i}"}
            for i in range(60)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    prompts, not_checked = _prompts(tokenizer, path, "auto")
    assert prompts and "with an input are not checked" in not_checked
    folder = tmp_path / "adapter"
    tokenizer.save_pretrained(folder)
    record_prompt_format(folder, "auto", "alpaca")
    result = check_handoff("adapter folder", folder_ids(folder), prompts, tokenizer)
    assert result.passed, result.first_difference
    assert pd.Series([p.ids[0] for p in prompts]).eq(tokenizer.bos_token_id).all() == (
        tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)


def test_plain_text_has_no_prompt_format_to_check(tmp_path, micro_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i} about things"}) + "\n" for i in range(40)))
    settings = dataset_settings(source=str(path))
    formatted = format_rows(tokenizer, settings, eval_fraction=0.3)
    loaded = load_dataset(settings)
    prompts, why = held_out_prompts(loaded, formatted.eval.to_pandas(), tokenizer,
                                    resolve_template("auto", "text", None), "normalized", ChatPolicy(), None, None)
    assert prompts == [] and why == "plain text has no prompt to format"
    gate = template_fidelity([], why)
    assert gate.passed and gate.detail == "not checked: plain text has no prompt to format"
    assert clean_rows(loaded).hashes.size == 40
