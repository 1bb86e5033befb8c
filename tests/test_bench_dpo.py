"""bench/dpo_parity.py makes its pairs, reads both tools' outputs and sums them up correctly: sample outputs in,
figures and verdicts out, no training and no model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _runs  # noqa: E402
import dpo_parity  # noqa: E402

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Say hello again.", "input": "", "output": "Hello!"},
]


def test_pairs_are_each_rows_prompt_and_output_against_another_rows_different_output():
    pairs = dpo_parity.derive_pairs(ROWS, seed=0)
    assert pairs == dpo_parity.derive_pairs(ROWS, seed=0)  # deterministic for a seed
    assert [pair["prompt"] for pair in pairs] == ["Name a colour.", "Add the numbers.\n2 and 3", "Say hello.",
                                                  "Say hello again."]
    assert [pair["chosen"] for pair in pairs] == [row["output"] for row in ROWS]
    for pair in pairs:
        assert pair["rejected"].strip() != pair["chosen"].strip()  # never the same answer, even from another row
        assert pair["rejected"] in {row["output"] for row in ROWS}


def test_the_inline_template_is_llamafactorys_alpaca_and_the_configs():
    import jinja2

    template = jinja2.Environment().from_string(dpo_parity.ALPACA_JINJA)
    user = [{"role": "user", "content": "Add the numbers.\n2 and 3"}]
    prompt = template.render(messages=user, eos_token="</s>", add_generation_prompt=True)
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nAdd the numbers.\n2 and 3\n\n### Response:\n")
    full = template.render(messages=user + [{"role": "assistant", "content": "5"}], eos_token="</s>")
    assert full == prompt + "5</s>\n\n"
    config = yaml.safe_load((dpo_parity.REPO / dpo_parity.PIPELINE_DPO_CONFIG).read_text())
    assert config["dataset"]["template"] == dpo_parity.ALPACA_JINJA
    assert config["training"]["objective"] == "dpo" and "init_adapter" not in config["training"]


def ids_frame(rows: list[tuple[list[int], list[int], list[int]]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["prompt_ids", "chosen_ids", "rejected_ids"])


def test_selection_keeps_pairs_that_fit_with_llamafactorys_longer_answers_and_drops_repeats():
    pairs = [{"prompt": "p", "chosen": str(i), "rejected": "r"} for i in range(4)] + [{"prompt": "p", "chosen": "0",
                                                                                         "rejected": "r"}]
    frame = ids_frame([([1] * 4, [2] * 4, [3] * 2),  # 8 + 2 = 10: fits
                       ([1] * 4, [2] * 5, [3] * 2),  # 9 + 2 = 11: over
                       ([1] * 2, [2] * 2, [3] * 6),  # 8 + 2: fits
                       ([1], [2], [3]),
                       ([1] * 4, [2] * 4, [3] * 2)])  # the first pair again
    assert dpo_parity.select_pairs(pairs, frame, count=10, max_length=10) == [0, 2, 3]
    assert dpo_parity.select_pairs(pairs, frame, count=2, max_length=10) == [0, 2]


def test_real_tokens_count_the_prompt_in_both_sequences():
    frame = ids_frame([([1, 2, 3], [4, 5], [6]), ([1], [2, 3, 4], [5, 6])])
    assert dpo_parity.real_tokens(frame, 1.0) == (3 + 2 + 3 + 1) + (1 + 3 + 1 + 2)
    assert dpo_parity.real_tokens(frame, 2.0) == 2 * 16


def test_renderings_compared_token_by_token():
    ours = ids_frame([([1, 2], [3, 9], [4, 9]), ([1, 5], [6, 9], [7, 9])])
    theirs = ids_frame([([1, 2], [3, 9, 8, 8], [4, 9, 8, 8]), ([1, 5], [6, 9, 8, 8], [7, 0])])
    assert dpo_parity.compare_renderings(ours, theirs) == {
        "pairs": 2, "same_prompts": 2, "same_answers": 0, "same_answers_up_to_eos": 3, "answers": 4,
        "extra_tokens_after_eos": [[8, 8]]}
    assert dpo_parity.compare_renderings(ours, theirs.iloc[:1])["same_prompts"] == 0


PIPELINE_STDOUT = "progress\n" + json.dumps({
    "partition": "dpo-parity", "run_id": "r1", "wall_seconds": 90.0, "up_to_date": [],
    "assets": {
        "formatted_dataset": {"uri": "/s/formatted", "metadata": {"train_rows": 297, "eval_rows": 47, "duplicates": 0,
                                                                  "over_max_length": 0, "template": "inline"}},
        "trained_adapter": {"uri": "/s/trained_adapter/abc", "metadata": {
            "uri": "/s/trained_adapter/abc", "reused": False, "objective": "dpo", "reference": "base",
            "final_logged_loss": 0.69, "first_reward_margin": 0.0, "last_reward_margin": 0.03,
            "last_reward_accuracy": 0.5, "steps": 75, "train_seconds": 60.5}}},
})


def test_pipeline_cli_output_gives_train_time_split_and_the_adapter_folder():
    figures = dpo_parity.parse_pipeline_dpo_output(PIPELINE_STDOUT)
    assert figures == {"train_s": 60.5, "steps": 75, "train_loss": 0.69, "last_reward_margin": 0.03,
                       "last_reward_accuracy": 0.5, "adapter_dir": "/s/trained_adapter/abc",
                       "split": {"train_rows": 297, "eval_rows": 47, "duplicates": 0, "over_max_length": 0},
                       "reused": False}


LF_ALL_RESULTS = {"effective_tokens_per_sec": 190.0, "epoch": 1.0, "total_flos": 3.5e12, "train_loss": 0.699,
                  "train_runtime": 400.0, "train_samples_per_second": 0.7, "train_steps_per_second": 0.18}
LF_TRAINER_STATE = {"global_step": 75, "log_history": [
    {"loss": 0.6931, "rewards/margins": 0.0, "rewards/accuracies": 0.0, "step": 1},
    {"loss": 0.6723, "rewards/margins": 0.046, "rewards/accuracies": 0.65, "step": 75},
    {"train_runtime": 400.0, "train_loss": 0.699, "step": 75}]}


def test_llamafactory_results_give_real_tokens_per_second_and_the_logged_rewards():
    figures = dpo_parity.parse_lf_dpo_results(LF_ALL_RESULTS, LF_TRAINER_STATE, real=80_000)
    assert figures["train_s"] == 400.0 and figures["steps"] == 75
    assert figures["train_tokens"] == 80_000 and figures["tokens_per_s"] == 200.0
    assert figures["train_loss"] == 0.6723 and figures["epoch_train_loss"] == 0.699
    assert figures["mean_logged_loss"] == pytest.approx((0.6931 + 0.6723) / 2)
    assert figures["last_reward_margin"] == 0.046 and figures["last_reward_accuracy"] == 0.65
    assert figures["lf_effective_tokens_per_s"] == 190.0


def test_llamafactory_token_file_and_run_config():
    text = json.dumps({"prompt_ids": [[1, 2]], "chosen_ids": [[3, 9, 8]], "rejected_ids": [[4, 9, 8]], "real_tokens": 10})
    frame = dpo_parity.parse_lf_pair_tokens(text)
    assert list(frame.columns) == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert dpo_parity.real_tokens(frame, 1.0) == 10
    settings = dpo_parity.BenchSettings(learning_rate=1e-4, batch_size=2, max_length=128, beta=0.2)
    for qlora in (False, True):
        config = dpo_parity.lf_run_config(dpo_parity.lf_yaml_template(qlora), Path("/b"), Path("/d"), Path("/o"), settings)
        assert (config["model_name_or_path"], config["dataset_dir"], config["output_dir"]) == ("/b", "/d", "/o")
        assert config["stage"] == "dpo" and config["pref_loss"] == "sigmoid" and config["pref_beta"] == 0.2
        assert config["learning_rate"] == 1e-4 and config["per_device_train_batch_size"] == 2
        assert config["cutoff_len"] == 128 and config["dataset"] == dpo_parity.LF_TRAIN
        assert config["bf16"] is False and config["disable_gradient_checkpointing"] is True
        assert config.get("quantization_bit") == (4 if qlora else None)


def test_pipeline_overrides_carry_every_shared_setting():
    command = dpo_parity.pipeline_cli_command(Path("/b"), Path("/p/all.json"), dpo_parity.BenchSettings(qlora=True))
    sets = dict(command[index + 1].split("=", 1) for index, word in enumerate(command) if word == "--set")
    assert sets["base_model"] == "/b" and sets["dataset.source"] == "/p/all.json"
    assert sets["quantization.mode"] == "nf4" and sets["preference.beta"] == "0.1"
    assert sets["training.learning_rate"] == "0.0005" and sets["training.logging_steps"] == "5"
    assert command[-1] == "--json" and "+trained_adapter" in command


def measured(wall_s: float, rss_mb: float, others_cpu_s: float = 0.0) -> _runs.Measured:
    cpu = wall_s * 1.8
    return _runs.Measured(wall_s, "", "", rss_mb, 0.0, cpu, cpu + others_cpu_s)


def record(wall_s: float, train_s: float, rss_mb: float, correct: list[float], others_cpu_s: float = 0.0) -> dict:
    base = _runs.finish_record(measured(wall_s, rss_mb, others_cpu_s),
                               {"train_s": train_s, "tokens_per_s": 80_000 / train_s, "train_loss": 0.68})
    accuracy = sum(correct) / len(correct)
    return {**base, "preference_accuracy": accuracy, "preference_accuracy_ci95": [accuracy - 0.1, accuracy + 0.1],
            "reward_margin": 0.01, "per_pair_correct": correct}


def test_summary_ratios_accuracy_verdict_and_contended_runs(monkeypatch):
    monkeypatch.setattr(dpo_parity.os, "cpu_count", lambda: 2)
    ours = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
    theirs = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0]
    records = {
        "pipeline": [record(60.0, 40.0, 900.0, ours),
                     record(90.0, 70.0, 900.0, ours, others_cpu_s=90.0)],  # others took 50% of the 2 CPUs
        "llamafactory": [record(100.0, 80.0, 1200.0, theirs), {"error": "exit 1: crashed"}],
    }
    summary = dpo_parity.summarize(records, resamples=200)
    assert summary["medians"]["pipeline"]["runs"] == 1 and summary["medians"]["pipeline"]["wall_s"] == 60.0
    ratios = summary["ratios"]
    assert ratios["wall"] == {"ratio": 0.6, "target": "<= 0.8", "met": True}
    assert ratios["tokens_per_s"]["ratio"] == pytest.approx(2.0) and ratios["peak_rss"]["ratio"] == 0.75
    accuracy = ratios["preference_accuracy"]
    assert accuracy["difference"] == pytest.approx(1 / 8) and accuracy["wins_ties_losses"] == [1, 7, 0]
    assert accuracy["met"] and accuracy["point_no_worse"]
    assert summary["contended_runs"] == ["pipeline run 2: other processes took 50% of the CPUs (left out of the medians)"]
    table = dpo_parity.format_table(summary)
    assert "| pipeline | 1 | 60.0 | 40.0 |" in table
    assert "pipeline / LLaMA-Factory wall: 0.600, target <= 0.8: met" in table
    assert "held-out preference accuracy: +0.125" in table and "WARNING: the machine was shared" in table


def test_a_slower_less_accurate_pipeline_misses_both_targets():
    worse = [0.0] * 8
    better = [1.0] * 8
    summary = dpo_parity.summarize({"pipeline": [record(100.0, 80.0, 900.0, worse)],
                                    "llamafactory": [record(100.0, 80.0, 900.0, better)]}, resamples=200)
    assert not summary["ratios"]["wall"]["met"]
    assert not summary["ratios"]["preference_accuracy"]["met"]
    assert "NOT met" in dpo_parity.format_table(summary)


def test_failed_runs_are_listed_under_the_table():
    summary = dpo_parity.summarize({"pipeline": [{"error": "exit 1: lora_pipeline.cli run ...\nKeyError: 'loss'"}],
                                    "llamafactory": [record(100.0, 80.0, 900.0, [1.0, 0.0])]}, resamples=50)
    assert summary["ratios"] == {} and summary["failed_runs"] == ["pipeline run 1: exit 1: lora_pipeline.cli run ..."]
    assert "FAILED: pipeline run 1: exit 1" in dpo_parity.format_table(summary)
