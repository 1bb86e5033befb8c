"""Each real family end to end on the CPU: QLoRA on multi-turn data with reasoning (and tools where the
family's template renders them), merge, evaluation, the champion with its template_fidelity gate,
`generate` with the trained prompt format, and the GGUF export (llama.cpp's converter, the read-back
comparison with the safetensors, llama.cpp's tokenizer on held-out texts). Tiny random weights of the
family's own architecture around its real tokenizer (lora_pipeline/ml/base/families.py)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from test_cli import _cli

# Qwen3 renders tool calls (and learns them); the others' templates refuse or drop them (test_families.py).
WITH_TOOLS = {"qwen3"}
# llama.cpp's adapter converter cannot split a LoRA of DeepSeek's kv_b_proj (which 'auto' targets) into k_b and v_b,
# so its export is the merged model alone; the others write the base and the adapter too.
ADAPTER_NOT_CONVERTIBLE = {"deepseek-v3": "kv_b_proj"}


def _rows(count: int, tools: bool) -> list[dict]:
    rows = []
    for i in range(count):
        messages = [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": [{"type": "reasoning", "text": f"{i} twice"},
                                              {"type": "text", "text": f"{i} plus {i} is {2 * i}."}]},
            {"role": "user", "content": "And minus one?"},
            {"role": "assistant", "content": f"{2 * i - 1}."},
        ]
        row = {"messages": messages}
        if tools and i % 2:
            row["tools"] = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
            row["messages"] = [
                {"role": "user", "content": f"Add {i} and {i} with the tool."},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": i, "b": i}}}]},
                {"role": "tool", "content": str(2 * i)},
                {"role": "assistant", "content": f"The sum is {2 * i}."},
            ]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    """Tiny random models of each family, built once, as a user's downloaded base folder would be."""
    from lora_pipeline.ml.base.families import build_family_model

    folder = tmp_path_factory.mktemp("families")
    return lambda name: build_family_model(name, folder / name) if not (folder / name).is_dir() else folder / name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma3", "deepseek-v3"])
def test_a_family_runs_qlora_to_champion_with_its_own_template_and_generates(tmp_path, family, family_bases):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows(48, family in WITH_TOOLS)))
    config = tmp_path / f"{family}.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(family_bases(family)),
        "dataset": {"source": str(data), "template": "tokenizer", "eval_fraction": 0.25},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "quantization": {"mode": "nf4", "double_quant": True},
        "training": {"max_steps": 3, "batch_size": 4, "max_length": 256, "learning_rate": 2e-3, "warmup": 0.0,
                     "logging_steps": 1},
        "eval": {"max_examples": 8, "samples": 1, "max_new_tokens": 4},
    }))
    run = _cli(["run", str(config), "--json"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    formatted = summary["assets"]["formatted_dataset"]["metadata"]
    # Qwen3's thinking template renders the last answer unlike history: one example per learned turn.
    assert (formatted["per_turn_rows"] > 0) == (family == "qwen3")
    gates = summary["champion"]["gates"]
    assert summary["champion"]["promoted"], gates
    assert gates["template_fidelity"]["passed"] and "every hand-off gives the training prompt ids" in \
        gates["template_fidelity"]["detail"]
    adapter_dir = summary["assets"]["trained_adapter"]["uri"]
    merged_dir = summary["assets"]["merged_model"]["uri"]
    from transformers import AutoTokenizer, GenerationConfig

    from lora_pipeline.ml.base.families import FAMILIES

    base_tokenizer = AutoTokenizer.from_pretrained(family_bases(family))
    for folder in (adapter_dir, merged_dir):
        assert AutoTokenizer.from_pretrained(folder).chat_template == base_tokenizer.chat_template
    end_of_turn = base_tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    eos = GenerationConfig.from_pretrained(merged_dir).eos_token_id
    assert end_of_turn in ([eos] if isinstance(eos, int) else eos)

    answer = _cli(["generate", str(config), "--prompt", "What is 3 plus 3?", "--json", "--max-new-tokens", "4"],
                  tmp_path)
    assert answer.returncode == 0, answer.stderr[-3000:]
    answers = json.loads(answer.stdout.strip().splitlines()[-1])["answers"]
    assert set(answers) == {"base", family} and all(isinstance(text, str) for text in answers.values())

    exported = _cli(["run", str(config), "--select", "gguf_export", "--set", "export.gguf=f16", "--json"], tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    meta = json.loads(exported.stdout.strip().splitlines()[-1])["assets"]["gguf_export"]["metadata"]
    merged_gguf = Path(meta["uri"]) / meta["merged_file"]
    assert meta["merged_file"] == "merged.f16.gguf" and merged_gguf.stat().st_size == meta["merged_bytes"] > 0
    # Every tensor read back and compared with the merged safetensors, in the family's own GGUF layout.
    assert meta["merged_tensors_compared"] == meta["merged_tensors"] and meta["merged_tensors_not_compared"] == 0
    assert meta["merged_max_abs_diff"] < 2e-3  # fp16 rounding
    # llama.cpp's own tokenizer splits every held-out text (a subset: tokenizer_texts) as the family's does.
    assert 0 < meta["tokenizer_texts_checked"] == meta["tokenizer_texts_equal"]
    assert meta["tokenizer_first_differing_text"] is None
    if family in ADAPTER_NOT_CONVERTIBLE:
        assert ADAPTER_NOT_CONVERTIBLE[family] in meta["adapter_skipped"] and "adapter_file" not in meta
    else:
        assert meta["adapter_tensors_compared"] == meta["adapter_tensors"] > 0 and meta["adapter_max_abs_diff"] < 1e-3
        assert (Path(meta["uri"]) / meta["adapter_file"]).is_file()
    from lora_pipeline.ml.export.tokens import read_gguf

    # Ollama and llama.cpp's chat code prompt with the GGUF's template: the one training rendered with.
    written = read_gguf(merged_gguf).fields["tokenizer.chat_template"].contents()
    assert written == AutoTokenizer.from_pretrained(adapter_dir).chat_template


def test_validate_shows_the_first_example_as_it_will_be_trained_with_the_learned_parts_marked(tmp_path,
                                                                                               family_bases):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows(24, tools=False)))
    config = tmp_path / "qwen3.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(family_bases("qwen3")),
                                      "dataset": {"source": str(data), "eval_fraction": 0.25},
                                      "training": {"max_length": 256}}))
    result = _cli(["validate", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "template    tokenizer; 24 conversations as 48 per-turn examples" in out
    first = textwrap.dedent(out.split("learned tokens between ⟦ ⟧):\n")[1].split("\n  training")[0])
    # An answer with its reasoning and end-of-turn token is learned; the user's turn before it is not.
    assert re.search(r"<\|im_start\|>user\nWhat is (\d+) plus \1\?<\|im_end\|>\n<\|im_start\|>assistant\n"
                     r"⟦<think>\n\1 twice\n</think>\n\n\1 plus \1 is \d+\.<\|im_end\|>⟧", first), first
    summary = json.loads(_cli(["validate", str(config), "--json"], tmp_path).stdout.strip().splitlines()[-1])
    assert summary["tokens"]["per_turn_rows"] == 24
    assert summary["tokens"]["first_example"]["learned"].endswith("<|im_end|>")
