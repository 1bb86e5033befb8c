"""Benchmark tasks through lm-evaluation-harness (ml/benchmarks.py): the shipped task runs offline on
a PEFT-wrapped micro Llama in-process, task folders find their data from any working directory, and
an unknown name fails fast without building lm-eval's 35-second built-in task index."""

from __future__ import annotations

import json
import socket
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def peft_model(micro_base):
    """The micro base with a fresh LoRA adapter on q_proj/v_proj, and its tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(micro_base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model, AutoTokenizer.from_pretrained(micro_base)


@pytest.fixture
def no_network(monkeypatch):
    """Offline hub settings, and any socket connection fails the test instead of reaching out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test forbids network access (to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_shipped_task_runs_in_process_on_a_peft_model(peft_model, no_network):
    from lora_pipeline.ml.benchmarks import SHIPPED_TASK, run_benchmarks

    model, tokenizer = peft_model
    model.train()
    messages: list[str] = []
    generator_state = torch.random.get_rng_state()

    started = time.perf_counter()
    scores = run_benchmarks(model, tokenizer, [SHIPPED_TASK], limit=10, batch_size=4, log=messages.append)
    print(f"\nrun_benchmarks({SHIPPED_TASK}, limit=10): {time.perf_counter() - started:.1f}s -> {scores}")

    assert set(scores) == {SHIPPED_TASK}
    metrics = scores[SHIPPED_TASK]
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    assert all(type(value) is float for value in metrics.values())
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    # Ten examples: accuracy is a multiple of a tenth.
    assert round(metrics["acc"] * 10, 6) == round(metrics["acc"] * 10)
    assert no_network == []
    # The caller's model and random generators are as they were (lm-eval sets eval mode and reseeds).
    assert model.training
    assert torch.equal(torch.random.get_rng_state(), generator_state)
    # lm-eval's own records reach the callback, not stderr.
    assert any(message.startswith("lm-eval: ") for message in messages)


def test_task_folder_data_resolves_against_the_yaml_not_the_working_directory(
    peft_model, no_network, tmp_path, monkeypatch
):
    from lora_pipeline.ml.benchmarks import run_benchmarks

    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = [{"q": f"Is {n} even?", "choices": ["yes", "no"], "label": n % 2} for n in range(6)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "parity.yaml").write_text(
        "task: parity_check\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: rows.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    model, tokenizer = peft_model
    scores = run_benchmarks(model, tokenizer, ["parity_check"], include_path="../tasks")

    assert set(scores) == {"parity_check"}
    assert 0.0 <= scores["parity_check"]["acc"] <= 1.0
    assert no_network == []


def test_unknown_task_fails_fast_naming_it(peft_model, no_network, monkeypatch):
    import lm_eval.tasks

    from lora_pipeline.ml.benchmarks import SHIPPED_TASKS_DIR, run_benchmarks

    built_with_defaults: list[bool] = []
    original = lm_eval.tasks.TaskManager

    class RecordingTaskManager(original):
        def __init__(self, *args, include_defaults: bool = True, **kwargs):
            built_with_defaults.append(include_defaults)
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", RecordingTaskManager)
    model, tokenizer = peft_model

    started = time.perf_counter()
    with pytest.raises(ValueError) as raised:
        run_benchmarks(model, tokenizer, ["no_such_benchmark_xyz"])
    print(f"\nunknown task rejected in {time.perf_counter() - started:.1f}s")

    assert "no_such_benchmark_xyz" in str(raised.value)
    assert str(SHIPPED_TASKS_DIR) in str(raised.value)
    assert built_with_defaults == [False]
    assert no_network == []
