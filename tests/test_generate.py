"""`lora-pipeline generate`: one prompt, answered by the base and by each config's adapter from one loaded base."""

from __future__ import annotations

import json

import pytest

from test_cli import _cli


@pytest.fixture
def cli(tmp_path):
    """Run the CLI in a process of its own (as the other CLI tests do: a run's loggers outlive pytest's captured
    streams), on a temp instance and store; returns (exit code, stdout, stderr)."""
    store = str(tmp_path / "store")

    def run(*args: str) -> tuple[int, str, str]:
        completed = _cli([*args, "--storage", store], tmp_path)
        return completed.returncode, completed.stdout, completed.stderr

    return run


def test_a_prompt_renders_as_training_rendered_it(micro_base):
    from transformers import AutoTokenizer

    from lora_pipeline.ml.adapters import PromptStyle, prompt_ids
    from lora_pipeline.ml.data.templates import alpaca_prompt

    tokenizer = AutoTokenizer.from_pretrained(micro_base)
    alpaca = prompt_ids(tokenizer, "Add 2 and 3.", PromptStyle("alpaca", system_prompt="Be brief."))
    assert tokenizer.decode(alpaca, skip_special_tokens=True) == alpaca_prompt("Add 2 and 3.", "", "Be brief.")
    chat = tokenizer.decode(prompt_ids(tokenizer, "Add 2 and 3.", PromptStyle("alpaca", template="chatml")))
    assert chat.endswith("<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n")
    plain = prompt_ids(tokenizer, "Add 2 and 3.", PromptStyle("prompt_completion"))
    assert tokenizer.decode(plain, skip_special_tokens=True) == "Add 2 and 3."


def test_the_prompt_style_is_the_training_configs_with_the_format_formatted_dataset_detected(tmp_path, write_config):
    from lora_pipeline.cli.generate import Model, prompt_style
    from lora_pipeline.config.registry import load_config_file
    from lora_pipeline.resources.storage import ArtifactStore

    store = ArtifactStore(root=str(tmp_path / "store"))
    formatted = tmp_path / "formatted"
    formatted.mkdir()
    (formatted / "format_summary.json").write_text(json.dumps({"format": "sharegpt", "template": "chatml"}))
    formatted_ref = store.publish(formatted, "chat", "formatted_dataset")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    # Trained with --set dataset.template=chatml and a system prompt: the lineage's settings win over the file's.
    trained = {"format": "auto", "template": "chatml", "system_prompt": "Be brief."}
    (adapter / "LINEAGE.json").write_text(json.dumps({
        "config": {"dataset": trained},
        "parents": {"formatted_dataset": {"uri": formatted_ref.uri, "sha256": formatted_ref.sha256}},
    }))
    path = write_config("chat", dataset={"format": "auto"})
    style = prompt_style(store, adapter, Model(path, "chat", load_config_file(path)))
    assert (style.format, style.template, style.system_prompt) == ("sharegpt", "chatml", "Be brief.")


@pytest.mark.slow
def test_adapters_of_two_configs_answer_side_by_side_and_other_bases_are_refused(write_config, cli):
    steps = {"training": {"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3, "max_length": 96,
                          "logging_steps": 2, "warmup": 0.0}}
    small = write_config("micro-r4", lora={"r": 4}, **steps)
    large = write_config("micro-r8", lora={"r": 8}, **steps)
    for path in (small, large):
        code, _, err = cli("run", str(path), "--select", "+trained_adapter")
        assert code == 0, err[-3000:]

    code, out, err = cli("generate", str(small), str(large), "--prompt", "What is 2 plus 3?", "--json",
                         "--max-new-tokens", "6")
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prompt"] == "What is 2 plus 3?"
    assert list(result["answers"]) == ["base", "micro-r4", "micro-r8"]
    assert all(isinstance(answer, str) for answer in result["answers"].values())

    # Blends of the two: cat takes unequal ranks; linear would be wrong in PEFT with them and is refused.
    code, out, err = cli("generate", str(small), str(large), "--prompt", "What is 2 plus 3?", "--json",
                         "--max-new-tokens", "6", "--blend", "mix=cat:0.5,0.5")
    assert code == 0, err[-3000:]
    assert list(json.loads(out.strip().splitlines()[-1])["answers"]) == ["base", "micro-r4", "micro-r8", "mix"]
    code, out, err = cli("generate", str(small), str(large), "--prompt", "hi", "--blend", "mix=linear:0.5,0.5")
    assert code == 2 and err.startswith("error: --blend") and "rank" in err
    assert cli("generate", str(small), str(large), "--prompt", "hi", "--blend", "mix=linear:1")[0] == 2

    code, out, _ = cli("generate", str(small), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "6")
    assert code == 0
    assert "=== base (no adapter)" in out and "=== micro-r4 (adapter)" in out
    assert out.split("=== micro-r4 (adapter)\n")[1].strip() == (result["answers"]["micro-r4"] or "(empty answer)")

    # Another base: the same model unquantized. Its base is enough to refuse (no adapter is needed).
    other = write_config("micro-full", quantization={"mode": "none"}, **steps)
    code, _, err = cli("run", str(other), "--select", "+quantized_base")
    assert code == 0, err[-3000:]
    code, out, err = cli("generate", str(small), str(other), "--prompt", "hi", "--json")
    assert code == 2 and not out
    line = err.strip()
    assert line.count("\n") == 0 and "micro-r4.yaml" in line and "micro-full.yaml" in line
    assert "different bases" in line

    # A config whose pipeline never ran: told which run makes what is missing.
    never = write_config("micro-never", lora={"r": 16})
    code, _, err = cli("generate", str(never), "--prompt", "hi")
    assert code == 2
    assert "micro-never.yaml" in err and "run `lora-pipeline run" in err and "first" in err


def test_thinking_is_switched_where_the_template_has_the_switch_and_refused_where_not(micro_base):
    from transformers import AutoTokenizer

    from lora_pipeline.ml.adapters import NoThinkingSwitch, PromptStyle, prompt_ids
    from lora_pipeline.ml.base.families import tokenizer_dir

    qwen3 = AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))
    style = PromptStyle("messages", template="tokenizer")
    trained = qwen3.decode(prompt_ids(qwen3, "Hi", style))
    off = qwen3.decode(prompt_ids(qwen3, "Hi", PromptStyle("messages", template="tokenizer", enable_thinking=False)))
    assert trained.endswith("<|im_start|>assistant\n") and off == trained + "<think>\n\n</think>\n\n"
    llama = AutoTokenizer.from_pretrained(micro_base)
    with pytest.raises(NoThinkingSwitch, match="no thinking switch"):
        prompt_ids(llama, "Hi", PromptStyle("messages", template="chatml", enable_thinking=True))
