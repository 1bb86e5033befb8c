"""Versioned caching: nothing changed recomputes nothing; a change re-runs what reads it and what follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from conftest import REPO, micro_config_data
from lora_pipeline.assets.provenance import stage_versions
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.config.registry import validate_config

STAGES = stage_names()


def _versions(source="s1", **sections):
    return stage_versions(validate_config(micro_config_data(**sections), "test"), source)


def _changed(before: dict, after: dict) -> list[str]:
    return [stage for stage in STAGES if before[stage] != after[stage]]


def test_each_change_moves_exactly_the_stages_that_read_it_and_those_after():
    hub = {"base_model": "acme/model"}
    base = _versions(**hub)
    assert _versions(**hub) == base  # deterministic
    assert _changed(base, _versions(lora={"r": 4}, **hub)) == ["trained_adapter", "merged_model", "eval_report", "champion"]
    assert _changed(base, _versions(training={"learning_rate": 1e-3}, **hub)) == [
        "trained_adapter", "merged_model", "eval_report", "champion"]
    assert _changed(base, _versions(training={"checkpoint_every": 7, "logging_steps": 1}, **hub)) == []
    assert _changed(base, _versions(eval={"samples": 3}, **hub)) == ["eval_report", "champion"]
    assert _changed(base, _versions(merge={"dtype": "float32"}, **hub)) == ["merged_model", "eval_report", "champion"]
    assert _changed(base, _versions(quantization={"mode": "int8"}, **hub)) == [
        "quantized_base", "trained_adapter", "merged_model", "eval_report", "champion"]
    assert _changed(base, _versions(source="s2", **hub)) == [
        "raw_dataset", "formatted_dataset", "trained_adapter", "merged_model", "eval_report", "champion"]
    assert _changed(base, _versions(dataset={"template": "chatml"}, **hub)) == [
        "formatted_dataset", "trained_adapter", "merged_model", "eval_report", "champion"]
    # A built-in model's tokenizer is trained on the data: new data, new base.
    assert "quantized_base" in _changed(_versions(), _versions(source="s2"))


def test_new_data_in_the_source_file_changes_its_version(tmp_path):
    from conftest import dataset_settings
    from lora_pipeline.ml.data.raw import dataset_source_version

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    before = dataset_source_version(dataset_settings(source=str(data)))
    assert dataset_source_version(dataset_settings(source=str(data))) == before
    data.write_text('{"instruction": "a", "output": "c"}\n')
    assert dataset_source_version(dataset_settings(source=str(data))) != before


def test_source_versions_hash_a_local_file_again_only_after_it_changes(tmp_path):
    from conftest import dataset_settings
    from lora_pipeline.ml.data import sources
    from lora_pipeline.ml.data.raw import dataset_source_version

    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    os.utime(data, ns=(10**18, 10**18))  # long settled: files modified in the last seconds are never trusted
    settings = dataset_settings(source=str(data))
    before = sources._hash_file.cache_info()
    version = dataset_source_version(settings)
    assert dataset_source_version(settings) == version
    after = sources._hash_file.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)  # read once, then remembered

    data.write_text('{"instruction": "a", "output": "c"}\n')  # same size
    os.utime(data, ns=(10**18 + 1, 10**18 + 1))
    assert dataset_source_version(settings) != version
    assert sources._hash_file.cache_info().misses - after.misses == 1

    data.write_text('{"instruction": "a", "output": "d"}\n')  # just written: read each time until it settles
    settled = sources._hash_file.cache_info()
    recent = dataset_source_version(settings)
    assert recent != version and dataset_source_version(settings) == recent
    assert sources._hash_file.cache_info() == settled  # not remembered under a timestamp that may yet be reused


def test_the_ui_marks_downstream_assets_stale_when_the_data_changes(tmp_path, write_config, fake_resources):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
    from lora_pipeline.assets.common import MODEL_PARTITIONS

    data = tmp_path / "data.json"
    rows = json.loads((REPO / "lora_pipeline" / "data" / "sample_instructions.json").read_text())[:60]
    data.write_text(json.dumps(rows))
    write_config("micro", dataset={"source": str(data), "max_rows": None})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    data_assets = [asset for asset in PIPELINE_ASSETS if asset.key.path[-1] in ("raw_dataset", "formatted_dataset")]
    definitions = dg.Definitions(assets=PIPELINE_ASSETS, asset_checks=PIPELINE_CHECKS, resources=fake_resources)

    def status(name):
        resolver = CachingStaleStatusResolver(instance, definitions.resolve_asset_graph(), LoadingContextForTest(instance))
        return resolver.get_status(dg.AssetKey(name), "micro")

    assert dg.materialize(data_assets, partition_key="micro", instance=instance, resources=fake_resources).success
    assert status("formatted_dataset") == StaleStatus.FRESH
    data.write_text(json.dumps(rows[:50]))
    assert dg.materialize(data_assets[:1], partition_key="micro", instance=instance, resources=fake_resources).success
    assert status("formatted_dataset") == StaleStatus.STALE


def _run(tmp_path, config, *extra, refusal_ok=False):
    """A CLI run's --json summary; refusal_ok: a candidate the champion gates refuse is fine (exit 3)."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    done = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--storage", str(tmp_path / "store"), "--json",
         *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode in ((0, 3) if refusal_ok else (0,)), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_rerun_with_nothing_changed_runs_nothing_and_a_new_rank_reruns_training_onward(tmp_path, write_config):
    config = write_config("micro")
    first, _ = _run(tmp_path, config)
    assert first["up_to_date"] == [] and first["run_id"]
    _assert_every_artifact_carries_its_lineage(tmp_path, first)

    again, stderr = _run(tmp_path, config)
    assert again["run_id"] is None and again["up_to_date"] == STAGES
    assert "up to date, not run" in stderr
    assert {name: entry["uri"] for name, entry in again["assets"].items()} == {
        name: entry["uri"] for name, entry in first["assets"].items()}

    # Refused by the champion's gates (an improvement no adapter makes): the summary still says what was up to date.
    ranked, _ = _run(tmp_path, config, "--set", "lora.r=4", "--set", "promotion.min_improvement=100", refusal_ok=True)
    assert ranked["champion"]["promoted"] is False
    assert ranked["up_to_date"] == ["raw_dataset", "formatted_dataset", "quantized_base"]
    assert ranked["assets"]["trained_adapter"]["uri"] != first["assets"]["trained_adapter"]["uri"]
    assert ranked["assets"]["eval_report"]["metadata"]["version"] != first["assets"]["eval_report"]["metadata"]["version"]

    forced, _ = _run(tmp_path, config, "--set", "lora.r=4", "--select", "eval_report", "--force")
    assert forced["up_to_date"] == [] and forced["run_id"]

    # A data check's threshold: formatted_dataset (and the built-in base, whose tokenizer is trained
    # on the data) re-run and make the same bytes, so the adapter trained on them is reused.
    rechecked, _ = _run(tmp_path, config, "--set", "lora.r=4", "--set", "dataset.max_truncation_rate=0.5",
                        refusal_ok=True)
    assert rechecked["up_to_date"] == ["raw_dataset"]
    adapter = rechecked["assets"]["trained_adapter"]
    assert adapter["metadata"]["reused"] is True and adapter["uri"] == ranked["assets"]["trained_adapter"]["uri"]


def _assert_every_artifact_carries_its_lineage(tmp_path, first):
    """LINEAGE.json in every artifact, consistent with the run's metadata; the models' cards carry it, the champion's
    card the eval figures and the gates."""
    for name, entry in first["assets"].items():
        lineage = json.loads((tmp_path / "store" / "micro" / name / entry["uri"].rsplit("/", 1)[-1] / "LINEAGE.json")
                             .read_text())
        assert lineage["asset"] == name and lineage["version"] == entry["metadata"]["version"]
        assert lineage["config"]["base_model"] == "builtin:micro-llama" and lineage["seed"] == 0
        assert lineage["libraries"]["transformers"] and lineage["git_commit"] and lineage["wall_seconds"] >= 0
        assert lineage["hardware"]["cpus"] and (lineage.get("dataset_fingerprint") or name == "quantized_base")
        for parent, fact in lineage["parents"].items():
            assert fact["version"] == first["assets"][parent]["metadata"]["version"]
    for name in ("trained_adapter", "merged_model"):
        card = (tmp_path / "store" / "micro" / name / first["assets"][name]["uri"].rsplit("/", 1)[-1] / "README.md")
        text = card.read_text()
        assert "## Lineage" in text and "dataset fingerprint" in text and "libraries: torch" in text
        assert "## Evaluation" not in text  # published artifacts are never amended
    champion_card = (tmp_path / "store" / "micro" / "champion" / first["assets"]["champion"]["uri"].rsplit("/", 1)[-1]
                     / "README.md").read_text()
    assert "## Evaluation" in champion_card and "## Promotion" in champion_card
