"""bench/peer_parity.py reads every tool's output and sums it up correctly: sample outputs in, figures and
ratios out, no training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import _runs  # noqa: E402
import peer_parity  # noqa: E402

PIPELINE_STDOUT = "some progress line\n" + json.dumps({
    "partition": "recipe-parity", "run_id": "r1", "wall_seconds": 70.0, "up_to_date": [],
    "assets": {"raw_dataset": {"uri": "x", "metadata": {}},
               "trained_adapter": {"uri": "y", "metadata": {
                   "train_loss": 7.95, "final_logged_loss": 7.61, "train_seconds": 50.0, "train_tokens": 170_000,
                   "tokens_per_second": 3400.0, "peak_memory_mb": 880.5, "steps": 84, "pad_fraction": 0.0, "precision": "fp32",
                   "gradient_checkpointing": False, "trainable_dtype": "float32"}}},
})
RECIPE_STDOUT = "{'loss': 8.1}\n" + json.dumps({
    "train_loss": 7.9, "train_runtime_s": 80.0, "wall_s": 88.0, "train_tokens": 172_000, "tokens_per_s": 2150.0,
    "peak_rss_mb": 1968.0})
LF_ALL_RESULTS = {"epoch": 1.0, "total_flos": 1.2e12, "train_loss": 6.4, "train_runtime": 64.0,
                  "train_samples_per_second": 11.0, "train_steps_per_second": 1.3, "effective_tokens_per_sec": 2800.0}
LF_TRAINER_STATE = {"log_history": [{"loss": 7.2, "step": 10}, {"loss": 5.9, "step": 80},
                                    {"train_runtime": 64.0, "train_loss": 6.4, "step": 84}]}
LF_COUNT_STDOUT = "loading...\n" + json.dumps(
    {"packed_rows": 700, "padded_tokens": 179_200, "real_tokens": 160_000, "loss_tokens": 90_000})


def time_verbose_stderr(max_rss_kb: int, elapsed: str = "1:12.50") -> str:
    return f"""tool's own stderr
\tCommand being timed: "python -m lora_pipeline.cli run configs/bench/recipe-parity.yaml"
\tUser time (seconds): 130.21
\tSystem time (seconds): 4.10
\tPercent of CPU this job got: 185%
\tElapsed (wall clock) time (h:mm:ss or m:ss): {elapsed}
\tAverage shared text size (kbytes): 0
\tMaximum resident set size (kbytes): {max_rss_kb}
\tPage size (bytes): 4096
\tExit status: 0
"""


def measured(wall_s: float, max_rss_kb: int, tree_mb: float = 0.0) -> _runs.Measured:
    stderr = time_verbose_stderr(max_rss_kb)
    figures = _runs.parse_time_verbose(stderr)
    # The machine was busy for the tool's own CPU seconds and nothing else: a quiet run.
    return _runs.Measured(wall_s, "", stderr, figures["max_rss_mb"], tree_mb, figures["cpu_s"], figures["cpu_s"])


def sample_records() -> dict[str, list[dict]]:
    lf_counts = peer_parity.parse_lf_token_counts(LF_COUNT_STDOUT)
    lf_figures = peer_parity.parse_lf_results(LF_ALL_RESULTS, LF_TRAINER_STATE, lf_counts)
    lf_slow = {**lf_figures, "train_s": 100.0, "tokens_per_s": 1600.0}
    return {
        "pipeline": [_runs.finish_record(measured(60.0, 1024 * 900), _runs.parse_pipeline_output(PIPELINE_STDOUT))],
        "recipe": [_runs.finish_record(measured(100.0, 1024 * 2000), _runs.parse_recipe_output(RECIPE_STDOUT))],
        "lf_shared": [_runs.finish_record(measured(120.0, 1024 * 1200), lf_slow)],
        "lf_best": [_runs.finish_record(measured(80.0, 1024 * 1500), lf_figures), {"error": "exit 1: crashed"}],
    }


def test_time_verbose_report_gives_peak_rss_wall_and_status():
    figures = _runs.parse_time_verbose(time_verbose_stderr(2_048_000, "1:02:03.5"))
    assert figures == {"max_rss_mb": 2000.0, "elapsed_s": 3723.5, "exit_status": 0, "cpu_s": pytest.approx(134.31)}
    assert _runs.parse_time_verbose("no report") == {"max_rss_mb": None, "elapsed_s": None, "exit_status": None,
                                                     "cpu_s": None}


def test_peak_rss_is_the_larger_of_the_process_mark_and_the_sampled_tree():
    assert measured(1.0, 1024 * 900, tree_mb=950.0).peak_rss_mb == 950.0
    assert measured(1.0, 1024 * 900, tree_mb=700.0).peak_rss_mb == 900.0


def test_pipeline_json_line_gives_trained_adapter_figures():
    figures = _runs.parse_pipeline_output(PIPELINE_STDOUT)
    assert figures["train_loss"] == 7.95 and figures["final_logged_loss"] == 7.61
    assert figures["train_s"] == 50.0 and figures["train_tokens"] == 170_000 and figures["tokens_per_s"] == 3400.0
    assert figures["own_peak_mb"] == 880.5 and figures["pad_fraction"] == 0.0
    assert figures["settings"] == {"precision": "fp32", "gradient_checkpointing": False, "trainable_dtype": "float32"}


def test_recipe_json_line_gives_its_figures():
    figures = _runs.parse_recipe_output(RECIPE_STDOUT)
    assert figures == {"train_loss": 7.9, "final_logged_loss": None, "train_s": 80.0, "train_tokens": 172_000,
                       "tokens_per_s": 2150.0, "own_peak_mb": 1968.0}


def test_llamafactory_tokens_per_s_counts_real_tokens_not_its_padded_figure():
    counts = peer_parity.parse_lf_token_counts(LF_COUNT_STDOUT)
    figures = peer_parity.parse_lf_results(LF_ALL_RESULTS, LF_TRAINER_STATE, counts)
    assert figures["tokens_per_s"] == pytest.approx(160_000 / 64.0)  # 2,500, not its effective 2,800
    assert figures["lf_effective_tokens_per_s"] == 2800.0
    assert figures["train_s"] == 64.0 and figures["train_loss"] == 6.4 and figures["final_logged_loss"] == 5.9
    assert peer_parity.parse_lf_results(LF_ALL_RESULTS, None, counts)["final_logged_loss"] is None


def test_record_measures_time_outside_training_from_outside_wall():
    record = sample_records()["pipeline"][0]
    assert record["wall_s"] == 60.0 and record["outside_training_s"] == pytest.approx(10.0)
    assert record["peak_rss_mb"] == 900.0 and record["own_peak_mb"] == 880.5


def test_summary_ratios_against_recipe_and_llamafactorys_best_settings():
    summary = peer_parity.summarize(sample_records())
    medians, ratios = summary["medians"], summary["ratios"]
    assert medians["lf_best"]["runs"] == 1  # the failed run is left out
    assert medians["lf_best"]["tokens_per_s"] == pytest.approx(2500.0)

    recipe = ratios["vs_recipe"]
    assert recipe["wall"]["ratio"] == pytest.approx(0.6) and recipe["wall"]["met"]
    assert recipe["tokens_per_s"]["ratio"] == pytest.approx(3400 / 2150) and recipe["tokens_per_s"]["met"]
    assert recipe["peak_rss"]["ratio"] == pytest.approx(900 / 2000) and recipe["peak_rss"]["met"]
    assert recipe["train_loss"]["ratio"] == pytest.approx(7.95 / 7.9) and recipe["train_loss"]["met"]

    peer = ratios["vs_llamafactory_best"]
    assert peer["wall"]["against"] == "lf_best" and peer["wall"]["ratio"] == pytest.approx(60 / 80)
    assert peer["wall"]["met"]  # 0.75 <= 0.8
    assert peer["tokens_per_s"]["against"] == "lf_best" and peer["tokens_per_s"]["ratio"] == pytest.approx(3400 / 2500)
    assert peer["peak_rss"]["against"] == "lf_shared" and peer["peak_rss"]["ratio"] == pytest.approx(900 / 1200)
    assert "train_loss" not in peer  # its loss is over responses only: not comparable

    table = peer_parity.format_table(summary)
    assert "| LLaMA-Factory (best CPU) | 1 | 80.0 | 64.0 | 16.0 | 2,500 | 1,500 | 6.4000 | 5.9000 | 134 | 0 |" in table
    assert "pipeline vs_recipe train_loss: 1.006, target within 1%: met" in table


def test_summary_flags_missed_targets_and_works_without_the_peer():
    records = sample_records()
    records["pipeline"][0].update(train_loss=8.1, wall_s=90.0)
    del records["lf_shared"], records["lf_best"]
    ratios = peer_parity.summarize(records)["ratios"]
    assert set(ratios) == {"vs_recipe"}
    assert not ratios["vs_recipe"]["wall"]["met"] and not ratios["vs_recipe"]["train_loss"]["met"]
    assert "NOT met" in peer_parity.format_table(peer_parity.summarize(records))


def test_runs_that_shared_the_machine_are_flagged():
    assert _runs.others_share(cpu_s=150.0, machine_busy_s=190.0, wall_s=100.0, cores=2) == pytest.approx(0.2)
    assert _runs.others_share(cpu_s=150.0, machine_busy_s=149.0, wall_s=100.0, cores=2) == 0.0
    assert _runs.others_share(cpu_s=None, machine_busy_s=190.0, wall_s=100.0, cores=2) is None
    records = sample_records()
    assert peer_parity.summarize(records)["contended_runs"] == []
    records["recipe"][0]["others_cpu_share"] = 0.35
    summary = peer_parity.summarize(records)
    assert summary["contended_runs"] == [
        "recipe run 1: other processes took 35% of the CPUs (kept: no quiet run of this tool)"]
    assert summary["medians"]["recipe"]["wall_s"] == 100.0
    # With a quiet run beside it, the contended one no longer counts.
    records["recipe"].append({**records["recipe"][0], "wall_s": 90.0, "others_cpu_share": 0.02})
    summary = peer_parity.summarize(records)
    assert summary["medians"]["recipe"]["wall_s"] == 90.0 and summary["medians"]["recipe"]["runs"] == 1
    assert "WARNING: the machine was shared during recipe run 1: other processes took 35% of the CPUs (left out " \
        in peer_parity.format_table(summary)


def test_best_cpu_settings_change_only_precision_and_checkpointing(tmp_path):
    template = (peer_parity.PEERS / "llamafactory_qlora_sft.yaml")
    if not template.exists():
        pytest.skip("the shared peers folder is not beside this checkout")
    shared = peer_parity.lf_run_config(template.read_text(), tmp_path / "base", tmp_path / "data", tmp_path / "out", False)
    best = peer_parity.lf_run_config(template.read_text(), tmp_path / "base", tmp_path / "data", tmp_path / "out", True)
    assert shared["model_name_or_path"] == str(tmp_path / "base") and shared["output_dir"] == str(tmp_path / "out")
    assert shared["bf16"] is True and "disable_gradient_checkpointing" not in shared
    assert best == {**shared, "bf16": False, "disable_gradient_checkpointing": True}
