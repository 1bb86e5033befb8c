"""Choosing what to ship, for real on the micro model: adapters on one base, a sweep's leaderboard, the
champion's gates, promotion and rollback through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from test_cli import _cli


def _adapter(base_dir: Path, out: Path, seed: int, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(out)
    return out


def test_adapters_on_one_base_score_as_each_alone(micro_base, tmp_path):
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_pipeline.ml.adapters import attach_adapters, using
    from lora_pipeline.ml.evaluation.per_example import forward_scores

    adapters = {"one": _adapter(micro_base, tmp_path / "one", 1, 4), "two": _adapter(micro_base, tmp_path / "two", 2, 8)}
    frame = pd.DataFrame({"input_ids": [[1, 5, 9, 13, 17, 21], [1, 7, 3, 30, 2]],
                          "loss_mask": [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]})
    shared = attach_adapters(AutoModelForCausalLM.from_pretrained(micro_base), adapters)
    for name, folder in adapters.items():
        with using(shared, name):
            together = forward_scores(shared, frame, 0, 2)
        alone = forward_scores(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base), folder), frame, 0, 2)
        pd.testing.assert_frame_equal(together, alone, atol=1e-5, rtol=0)
    with using(shared, None):
        bare = forward_scores(shared, frame, 0, 2)
    pd.testing.assert_frame_equal(bare, forward_scores(AutoModelForCausalLM.from_pretrained(micro_base), frame, 0, 2),
                                  atol=1e-5, rtol=0)
    assert not bare["loss"].equals(together["loss"])


@pytest.mark.slow
def test_a_sweep_of_two_ranks_shares_its_data_and_base_and_ranks_them(tmp_path, write_config):
    path = write_config("ranks", quantization={"mode": "none"})
    data = yaml.safe_load(path.read_text())
    # A blend of the two variants is ranked beside them (cat: their ranks differ).
    path.write_text(yaml.safe_dump({**data, "sweep": {"lora.r": [4, 16]}, "blends": [
        {"name": "both", "combination": "cat", "weights": {"ranks.r4": 0.5, "ranks.r16": 0.5}}]}))
    result = _cli(["run", str(path), "--json"], tmp_path, check_rc=0,
                  env={"LORA_PIPELINE_CONFIG_DIR": str(path.parent)})
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["variants"]) == ["ranks.r4", "ranks.r16"]
    second = summary["variants"]["ranks.r16"]
    assert {"raw_dataset", "formatted_dataset", "quantized_base"} <= set(second["up_to_date"])
    assert second["assets"]["quantized_base"]["metadata"]["reused_from"] == "ranks.r4"
    # Each variant's time is its own: together they are within the sweep's, and each line says its own.
    walls = [variant["wall_seconds"] for variant in summary["variants"].values()]
    assert sum(walls) <= summary["wall_seconds"]
    said = re.search(rf"model ranks.r16: run {second['run_id']} finished in (\d+)s", result.stderr)
    assert said and abs(int(said.group(1)) - walls[1]) <= 1
    assert "scores of base on this suite are cached" in result.stderr  # the base is scored once
    board = json.loads((Path(summary["leaderboard"]["uri"]) / "leaderboard.json").read_text())
    # The leaderboard's page in the UI shows its plot (inline: the UI shows metadata, not the folder's files).
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path / "dagster_home"))) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("leaderboard"))
        assert "](data:image/png;base64," in event.asset_materialization.metadata["leaderboard"].value
    rows = {row["partition"]: row for row in board["rows"]}
    assert set(rows) == {"ranks.r4", "ranks.r16", "both"} and board["recommended"] in ("ranks.r4", "ranks.r16")
    blend = rows["both"]
    assert blend["kind"] == "blend" and blend["lora_parameters"] == rows["ranks.r4"]["lora_parameters"] + rows[
        "ranks.r16"]["lora_parameters"]  # cat concatenates the two
    assert (Path(summary["leaderboard"]["uri"]) / blend["adapter"] / "adapter_config.json").exists()
    assert blend["vs_best"]["verdict"] in ("best", "better", "worse", "within noise")
    assert rows["ranks.r16"]["lora_parameters"] == 4 * rows["ranks.r4"]["lora_parameters"]
    assert rows["ranks.r4"]["modules_to_save_parameters"] == 0 and rows["ranks.r4"]["settings"] == {"lora.r": 4}
    for row in (rows["ranks.r4"], rows["ranks.r16"]):
        low, high = row["metrics"]["loss"]["ci95"]
        assert low <= row["metrics"]["loss"]["value"] <= high and row["train_seconds"] > 0 and row["peak_memory_mb"] > 0
    assert summary["champion"]["model"] == "ranks" and summary["champion"]["gates"]["recommended"]["passed"]
    # A sweep file in `generate` stands for its variants (dotted keys, which PEFT cannot use as adapter names).
    answered = _cli(["generate", str(path), "--prompt", "Name a colour.", "--max-new-tokens", "4", "--json",
                     "--blend", "mix=cat:0.5,0.5"], tmp_path, check_rc=0)
    assert list(json.loads(answered.stdout.strip().splitlines()[-1])["answers"]) == ["base", "ranks.r4", "ranks.r16", "mix"]
    listing = {row["model"]: row for row in json.loads(_cli(["list", "--json"], tmp_path, check_rc=0,
                                                            env={"LORA_PIPELINE_CONFIG_DIR": str(path.parent)}).stdout)}
    assert listing["ranks.r4"]["champion"] == summary["champion"]["version"]


@pytest.mark.slow
def test_a_refused_candidate_keeps_the_champion_and_rollback_restores_an_earlier_one(tmp_path, write_config):
    # The shipped lm-eval smoke task rides along: benchmarks on base and adapter, in-process, offline.
    path = write_config("micro", quantization={"mode": "none"},
                        eval={"benchmarks": ["lora_pipeline_tiny_mc"], "benchmark_limit": 6})
    first = json.loads(_cli(["run", str(path), "--json"], tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    champion = first["champion"]
    assert champion["promoted"] and set(champion["gates"]) == {
        "better_than_base", "no_regression", "forgetting", "merge_fidelity", "servable", "template_fidelity"}
    assert all(gate["passed"] for gate in champion["gates"].values())
    assert "every hand-off gives the training prompt ids" in champion["gates"]["template_fidelity"]["detail"]
    champion_dir = Path(first["assets"]["champion"]["uri"])
    first_metrics = json.loads((Path(first["assets"]["eval_report"]["uri"]) / "metrics.json").read_text())
    benchmarks = first_metrics["comparison"]["benchmarks"]
    assert set(benchmarks) == {"base", "adapter"}
    assert all(0.0 <= benchmarks[model]["lora_pipeline_tiny_mc"]["acc"] <= 1.0 for model in benchmarks)
    assert "## Benchmarks" in (Path(first["assets"]["eval_report"]["uri"]) / "report.md").read_text()
    assert "--enable-lora" in (champion_dir / "serving" / "serve-vllm.sh").read_text()  # rank 8, no modules_to_save
    assert "## Promotion" in (champion_dir / "README.md").read_text()

    refused = _cli(["run", str(path), "--json", "--set", "training.seed=1", "--set", "promotion.min_improvement=100"],
                   tmp_path, check_rc=3)
    refused_summary = json.loads(refused.stdout.strip().splitlines()[-1])
    decision = refused_summary["champion"]
    # The champion was scored beside the candidate (from the score cache: its scores on this suite exist).
    report_dir = Path(refused_summary["assets"]["eval_report"]["uri"])
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert "champion" in metrics and metrics["champion"]["loss"] == pytest.approx(first_metrics["adapter"]["loss"])
    assert all("champion" in sample for sample in json.loads((report_dir / "samples.json").read_text()))
    assert json.loads((report_dir / "model-index.json").read_text())["model-index"][0]["name"] == "micro"
    assert not decision["promoted"] and decision["version"] == champion["version"]
    assert not decision["gates"]["better_than_base"]["passed"]
    assert "gate better_than_base failed" in refused.stderr

    dry = _cli(["promote", str(path), "--dry-run", "--json"], tmp_path)
    assert dry.returncode in (0, 3) and json.loads(dry.stdout.strip().splitlines()[-1])["dry_run"]

    second = _cli(["run", str(path), "--json", "--set", "training.seed=2", "--set", "promotion.max_regression=100"],
                  tmp_path, check_rc=0)
    newer = json.loads(second.stdout.strip().splitlines()[-1])["champion"]
    assert newer["promoted"] and newer["version"] != champion["version"]
    assert "against champion" in newer["gates"]["no_regression"]["detail"]
    records = sorted((tmp_path / "store" / "_records" / "champions" / "micro").iterdir())
    again = _cli(["promote", str(path), "--json"], tmp_path, check_rc=0)
    assert f"{newer['version']} is already the champion of micro" in again.stderr and "nothing to do" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["unchanged"]
    assert sorted((tmp_path / "store" / "_records" / "champions" / "micro").iterdir()) == records  # no duplicate

    back = json.loads(_cli(["rollback", "micro", "--json"], tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    assert back["version"] == champion["version"] and back["previous"] == newer["version"]
    assert _cli(["rollback", "micro", "--to", "ffff"], tmp_path, check_rc=2).stderr.startswith("error: model 'micro' never")
    listing = {row["model"]: row for row in json.loads(_cli(["list", "--json"], tmp_path, check_rc=0).stdout)}
    assert listing["micro"]["champion"] == champion["version"]


@pytest.mark.slow
def test_dora_trains_on_the_4bit_base_and_is_shipped_merged_only(tmp_path, write_config):
    from lora_pipeline.ml.report.leaderboard import adapter_parameters
    from lora_pipeline.ml.serving import read_servability

    path = write_config("dora", lora={"use_dora": True}, training={"max_steps": 2})
    summary = json.loads(_cli(["run", str(path), "--json", "--select", "+trained_adapter"], tmp_path,
                              check_rc=0).stdout.strip().splitlines()[-1])
    adapter_dir = Path(summary["assets"]["trained_adapter"]["uri"])
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        assert any("lora_magnitude_vector" in name for name in weights.keys())  # DoRA's magnitudes, saved
    assert adapter_parameters(adapter_dir)[0] > 0  # counted with the LoRA parameters
    servability = read_servability(adapter_dir)
    assert servability.mode == "merged-only" and "DoRA" in " ".join(servability.reasons)


@pytest.mark.slow
def test_the_lora_only_sweep_demo_blends_exports_adapters_promotes_and_rolls_back(tmp_path):
    """configs/tiny-lora-sweep.yaml shows what the lm_head-training demo cannot: adapters served as adapters, a
    blend ranked beside the variants, the sweep's champion exported as base + adapter GGUF, a better round
    promoted and rolled back (docs/tutorials/sweep-and-promote.md walks through these commands)."""
    config = "configs/tiny-lora-sweep.yaml"
    first = json.loads(_cli(["run", config, "--json"], tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    champion = first["champion"]
    assert champion["promoted"] and "as a LoRA adapter" in champion["gates"]["servable"]["detail"]
    assert "recommended" in champion["gates"]
    rows = json.loads((Path(first["leaderboard"]["uri"]) / "leaderboard.json").read_text())["rows"]
    assert {row["partition"] for row in rows} == {"tiny-lora-sweep.r8", "tiny-lora-sweep.r32", "mix"}

    exported = json.loads(_cli(["run", config, "--select", "gguf_export", "--set", "export.gguf=q8_0", "--json"],
                               tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    folder = Path(exported["gguf_export"])
    assert {"adapter.gguf", "base.q8_0.gguf", "Modelfile.adapter"} <= {path.name for path in folder.iterdir()}

    better = json.loads(_cli(["run", config, "--set", "training.epochs=7", "--json"], tmp_path, check_rc=0)
                        .stdout.strip().splitlines()[-1])["champion"]
    assert better["promoted"] and better["version"] != champion["version"]
    back = json.loads(_cli(["rollback", "tiny-lora-sweep", "--json"], tmp_path, check_rc=0).stdout.strip().splitlines()[-1])
    assert back["version"] == champion["version"] and back["previous"] == better["version"]
