"""The <stage>_settings assets: the UI marks stale exactly what a config edit, a library upgrade or new
data would re-run, as soon as the model_configs sensor or `lora-pipeline run` reports it."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from conftest import micro_config_data
from lora_pipeline.assets.common import MODEL_PARTITIONS, settings_key
from lora_pipeline.assets.stages import stage_names
from lora_pipeline.assets.settings import report_settings
from lora_pipeline.config.registry import load_config_file
from lora_pipeline.ml.data.raw import dataset_source_version
from lora_pipeline.sensors import model_configs

STAGES = stage_names()
DATA_STAGES = ["raw_dataset", "formatted_dataset"]


def _tick(instance, fake_resources) -> dg.SensorResult:
    """One model_configs tick; its observations stored as the sensor daemon stores them."""
    context = dg.build_sensor_context(instance=instance)
    result = model_configs(context, registry=fake_resources["registry"])
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def _reported(result: dg.SensorResult) -> dict[str, list[str]]:
    """{model: [stages]} of a tick's observations."""
    reported: dict[str, list[str]] = {}
    for event in result.asset_events:
        assert event.asset_key.path[-1].endswith("_settings") and event.data_version
        reported.setdefault(event.partition, []).append(event.asset_key.path[-1].removesuffix("_settings"))
    return reported


def _edit(path, **sections):
    """Change sections of a config file in place, as a person editing the YAML would."""
    data = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path.write_text(yaml.safe_dump(data))


class _Staleness:
    """Stale statuses and their causes for one partition, as the UI computes them."""

    def __init__(self, instance, fake_resources, partition="micro"):
        from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS, SETTINGS_SPECS

        self.instance, self.partition = instance, partition
        self.graph = dg.Definitions(assets=[*PIPELINE_ASSETS, *SETTINGS_SPECS], asset_checks=PIPELINE_CHECKS,
                                    resources=fake_resources).resolve_asset_graph()

    def _resolver(self):
        from dagster._core.definitions.data_version import CachingStaleStatusResolver
        from dagster._core.loader import LoadingContextForTest

        return CachingStaleStatusResolver(self.instance, self.graph, LoadingContextForTest(self.instance))

    def stale(self, names) -> list[str]:
        from dagster._core.definitions.data_version import StaleStatus

        resolver = self._resolver()
        statuses = {name: resolver.get_status(dg.AssetKey(name), self.partition) for name in names}
        assert StaleStatus.MISSING not in statuses.values(), statuses
        return [name for name in names if statuses[name] == StaleStatus.STALE]

    def causes(self, name) -> list[str]:
        """'dependency: reason' for each reason the asset is stale."""
        return [f"{cause.dependency.asset_key.to_user_string()}: {cause.reason}"
                for cause in self._resolver().get_stale_causes(dg.AssetKey(name), self.partition)]


def test_every_stage_depends_on_its_settings_asset_and_the_tune_job_runs_only_the_six():
    from lora_pipeline.assets import PIPELINE_ASSETS, SETTINGS_SPECS
    from lora_pipeline.definitions import defs

    for asset in PIPELINE_ASSETS:
        settings = [key for key in asset.dependency_keys if key.path[-1].endswith("_settings")]
        assert settings == [settings_key(asset.key.path[-1])]
    assert [spec.key for spec in SETTINGS_SPECS] == [settings_key(stage) for stage in STAGES]
    for spec in SETTINGS_SPECS:
        assert spec.partitions_def == MODEL_PARTITIONS and spec.group_name == "settings"
        assert "model_configs sensor" in spec.description and "lora-pipeline run" in spec.description
    graph = defs.resolve_asset_graph()
    assert graph.get_all_asset_keys() == ({dg.AssetKey(s) for s in STAGES} | {settings_key(s) for s in STAGES}
                                          | {dg.AssetKey("leaderboard"), dg.AssetKey("published_model"),
                                             dg.AssetKey("gguf_export")})
    executed = defs.resolve_job_def("tune").asset_layer.executable_asset_keys
    assert executed == {dg.AssetKey(stage) for stage in STAGES}


def test_a_settings_version_covers_the_stage_and_those_before_it():
    from lora_pipeline.assets.provenance import settings_asset_versions
    from lora_pipeline.config.registry import validate_config

    def changed(**sections):
        before = settings_asset_versions(validate_config(micro_config_data(base_model="acme/model"), "t"), "s1")
        source = sections.pop("source", "s1")
        data = micro_config_data(base_model="acme/model", **sections)
        after = settings_asset_versions(validate_config(data, "t"), source)
        return [stage for stage in STAGES if before[stage] != after[stage]]

    assert changed(lora={"r": 4}) == ["trained_adapter", "merged_model", "eval_report", "champion"]
    assert changed(training={"checkpoint_every": 7}) == []
    assert changed(eval={"samples": 3}) == ["eval_report", "champion"]
    assert changed(promotion={"max_forgetting": 0.5}) == ["champion"]
    assert changed(source="s2") == ["raw_dataset", "formatted_dataset", "trained_adapter", "merged_model",
                                    "eval_report", "champion"]
    assert changed(quantization={"mode": "int8"}) == ["quantized_base", "trained_adapter", "merged_model",
                                                      "eval_report", "champion"]
    # New code in a stage re-runs it and what follows; the UI shows that before any run, as the CLI does it.
    import dataclasses

    from lora_pipeline.assets.stages import pipeline

    before = settings_asset_versions(validate_config(micro_config_data(base_model="acme/model"), "t"), "s1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(pipeline(), "merged_model", dataclasses.replace(pipeline()["merged_model"], code_version="next"))
        after = settings_asset_versions(validate_config(micro_config_data(base_model="acme/model"), "t"), "s1")
    assert [stage for stage in STAGES if before[stage] != after[stage]] == ["merged_model", "eval_report", "champion"]
    # The source unknown: only the stages whose settings do not cover it (a hub base's quantization).
    config = validate_config(micro_config_data(base_model="acme/model"), "t")
    assert list(settings_asset_versions(config, None)) == ["quantized_base"]


def test_the_config_sensor_reports_changed_settings_only_and_keeps_going_past_bad_configs(
        write_config, fake_resources, tmp_path):
    micro = write_config("micro")
    write_config("gone", base_model="acme/model", dataset={"source": str(tmp_path / "missing.json")})
    (tmp_path / "configs" / "broken.yaml").write_text("base_model: builtin:micro-llama\nlora: {r: many}\n")
    instance = dg.DagsterInstance.ephemeral()

    first = _tick(instance, fake_resources)
    (request,) = first.dynamic_partitions_requests  # partitions still added, the broken file's too
    assert sorted(request.partition_keys) == ["broken", "gone", "micro"]
    # The missing source leaves out the stages whose settings cover it: all but a hub base's quantization.
    assert _reported(first) == {"micro": STAGES, "gone": ["quantized_base"]}
    assert first.skip_reason is None

    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["broken", "gone", "micro"])
    again = _tick(instance, fake_resources)
    assert not again.asset_events and not again.dynamic_partitions_requests and again.skip_reason

    _edit(micro, lora={"r": 4})
    edited = _tick(instance, fake_resources)
    assert _reported(edited) == {"micro": ["trained_adapter", "merged_model", "eval_report", "champion"]}
    assert not _tick(instance, fake_resources).asset_events

    _edit(micro, training={"checkpoint_every": 3, "logging_steps": 1})  # saves and logs, produces the same
    assert not _tick(instance, fake_resources).asset_events

    # Whoever reported other settings last (a CLI run with --set killed before it could put the
    # file's back), the next tick compares with the instance and puts the file's back.
    overridden = load_config_file(micro, ["lora.r=2"])
    assert report_settings(instance, "micro", overridden, None) == []  # the source unknown: nothing covers it
    assert report_settings(instance, "micro", overridden, dataset_source_version(overridden.dataset)) == [
        "trained_adapter", "merged_model", "eval_report", "champion"]
    assert _reported(_tick(instance, fake_resources)) == {
        "micro": ["trained_adapter", "merged_model", "eval_report", "champion"]}


def _materialize(instance, fake_resources, assets, partition="micro"):
    from lora_pipeline.assets import PIPELINE_CHECKS

    result = dg.materialize([*assets, *PIPELINE_CHECKS], partition_key=partition, instance=instance,
                            resources=fake_resources, selection=[asset.key for asset in assets])
    assert result.success


def test_a_dataset_edit_new_data_or_a_library_upgrade_marks_the_data_stages_stale_before_any_run(
        write_config, fake_resources, data_file, monkeypatch):
    from lora_pipeline.assets import formatted_dataset, provenance, raw_dataset

    config = write_config("micro", dataset={"source": str(data_file), "max_rows": None})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    _tick(instance, fake_resources)  # reported before the run: the run records them
    _materialize(instance, fake_resources, [raw_dataset, formatted_dataset])
    ui = _Staleness(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == []

    _edit(config, lora={"r": 4})  # read by the model stages only
    _tick(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == []

    _edit(config, dataset={"template": "chatml"})  # read by formatted_dataset, not raw_dataset
    _tick(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == ["formatted_dataset"]
    assert ui.causes("formatted_dataset") == ["formatted_dataset_settings: has a new dependency data version"]
    _edit(config, dataset={"template": "auto"})  # undone: the settings are those the artifact was made from
    _tick(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == []

    data_file.write_text(data_file.read_text().replace("the", "a", 1))
    _tick(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == DATA_STAGES
    _materialize(instance, fake_resources, [raw_dataset, formatted_dataset])
    assert ui.stale(DATA_STAGES) == []

    upgraded = {**provenance.library_versions(), "transformers": "99.0"}
    monkeypatch.setattr(provenance, "library_versions", lambda: upgraded)
    _tick(instance, fake_resources)
    assert ui.stale(DATA_STAGES) == DATA_STAGES


@pytest.mark.slow
def test_a_config_edit_marks_exactly_the_stages_a_run_would_redo_stale_in_the_ui(write_config, fake_resources):
    from lora_pipeline.assets import PIPELINE_ASSETS

    config = write_config("micro", quantization={"mode": "none"}, training={"max_steps": 2})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    _tick(instance, fake_resources)
    # Up to the report: the champion's gates are not what this test is about (a 2-step adapter may not pass them).
    _materialize(instance, fake_resources, [asset for asset in PIPELINE_ASSETS if asset.key.path[-1] != "champion"])
    up_to_report = [stage for stage in STAGES if stage != "champion"]
    ui = _Staleness(instance, fake_resources)
    assert ui.stale(up_to_report) == []

    _edit(config, lora={"r": 4})
    _tick(instance, fake_resources)
    assert ui.stale(up_to_report) == ["trained_adapter", "merged_model", "eval_report"]
    assert ui.causes("eval_report") == ["eval_report_settings: has a new dependency data version"]
    _edit(config, lora={"r": 8})
    _tick(instance, fake_resources)
    assert ui.stale(up_to_report) == []

    _edit(config, training={"checkpoint_every": 1})
    _tick(instance, fake_resources)
    assert ui.stale(up_to_report) == []

    _edit(config, eval={"samples": 3})
    _tick(instance, fake_resources)
    assert ui.stale(up_to_report) == ["eval_report"]


def test_the_cli_reports_the_settings_it_runs_with_and_the_files_again_after_a_run_with_set(
        write_config, tmp_path):
    from lora_pipeline.assets.provenance import readable_source_version
    from lora_pipeline.assets.provenance import settings_asset_versions as versions_of
    from lora_pipeline.assets.settings import latest_settings_version, report_settings
    from lora_pipeline.cli.run import settings_reported
    from lora_pipeline.config.registry import load_config_file

    path = write_config("micro")
    file_config = load_config_file(path)
    source = readable_source_version(file_config)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    assert report_settings(instance, "micro", file_config, source) == STAGES
    assert report_settings(instance, "micro", file_config, source) == []  # only what differs from the latest
    file_versions = versions_of(file_config, source)

    overridden = load_config_file(path, ["lora.r=4"])
    with settings_reported(instance, "micro", overridden, source, path, ["lora.r=4"]):
        during = latest_settings_version(instance, "micro", "trained_adapter")
        assert during == versions_of(overridden, source)["trained_adapter"] != file_versions["trained_adapter"]
        assert latest_settings_version(instance, "micro", "formatted_dataset") == file_versions["formatted_dataset"]
    assert {stage: latest_settings_version(instance, "micro", stage) for stage in STAGES} == file_versions
