"""Retraining without a person: the dataset_changes sensor and the per-model schedules."""

from __future__ import annotations

import datetime
import json

import dagster as dg
import pytest

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.errors import ConfigError
from lora_pipeline.sensors import dataset_changes, model_schedules

SIX = ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report",
       "champion"]  # the six stages and the decision


def _evaluate_sensor(instance, fake_resources, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={k: fake_resources[k] for k in ("registry", "storage")})
    return dataset_changes(context)


def test_one_dataset_change_launches_exactly_one_run_of_that_model(write_config, fake_resources, data_file):
    write_config("micro", dataset={"source": str(data_file), "max_rows": None})
    write_config("untouched")  # the bundled sample: does not change
    write_config("opted-out", dataset={"source": str(data_file), "max_rows": None}, retrain={"on_data_change": False})
    instance = dg.DagsterInstance.ephemeral()

    first = _evaluate_sensor(instance, fake_resources, None)
    assert not first.run_requests  # first sight: recorded, not run
    assert set(json.loads(first.cursor)) == {"micro", "untouched"}
    unchanged = _evaluate_sensor(instance, fake_resources, first.cursor)
    assert not unchanged.run_requests and unchanged.cursor == first.cursor

    data_file.write_text(data_file.read_text().replace("the", "a", 1))
    changed = _evaluate_sensor(instance, fake_resources, unchanged.cursor)
    (request,) = changed.run_requests
    assert request.partition_key == "micro"
    assert request.run_key == f"micro:{json.loads(changed.cursor)['micro']}"
    assert [key.path[-1] for key in request.asset_selection] == SIX  # nothing was materialized yet
    assert not _evaluate_sensor(instance, fake_resources, changed.cursor).run_requests  # one change, one run


def test_an_unreadable_source_is_skipped_with_a_warning_not_a_failed_tick(write_config, fake_resources, tmp_path):
    write_config("gone", dataset={"source": str(tmp_path / "missing.json")})
    write_config("micro")
    result = _evaluate_sensor(dg.DagsterInstance.ephemeral(), fake_resources, None)
    assert set(json.loads(result.cursor)) == {"micro"}


def test_a_model_with_a_cron_gets_a_schedule_that_runs_only_its_stale_assets(write_config, fake_resources, tmp_path):
    write_config("micro", retrain={"schedule": "0 3 * * 1"})
    write_config("unscheduled")
    (schedule,) = model_schedules(str(tmp_path / "configs"))
    assert schedule.name == "retrain_micro" and schedule.cron_schedule == "0 3 * * 1"

    with dg.instance_for_test() as instance:
        _run_schedule(schedule, instance, fake_resources)


def _run_schedule(schedule, instance, fake_resources):
    from lora_pipeline.assets import PIPELINE_CHECKS, formatted_dataset, raw_dataset

    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    resources = {k: fake_resources[k] for k in ("registry", "storage")}
    when = datetime.datetime(2026, 11, 30, 3, 0, tzinfo=datetime.timezone.utc)

    from lora_pipeline.assets import PIPELINE_ASSETS
    from lora_pipeline.definitions import tune

    repository = dg.Definitions(assets=PIPELINE_ASSETS, asset_checks=PIPELINE_CHECKS, jobs=[tune],
                                schedules=[schedule], resources=fake_resources).get_repository_def()

    def evaluate():
        # As a context manager: the context enters an instance of its own, which sets Dagster's
        # current defs-state storage until the context is closed (left open, later tests that build
        # Definitions would read this test's deleted instance).
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when, resources=resources,
                                       repository_def=repository) as context:
            return schedule.evaluate_tick(context)

    (request,) = evaluate().run_requests
    assert request.partition_key == "micro" and request.run_key == f"micro:{when.isoformat()}"
    assert [key.path[-1] for key in request.asset_selection] == SIX
    assert dg.materialize([raw_dataset, formatted_dataset, *PIPELINE_CHECKS], partition_key="micro",
                          instance=instance, resources=fake_resources,
                          selection=["raw_dataset", "formatted_dataset"]).success
    (request,) = evaluate().run_requests
    assert [key.path[-1] for key in request.asset_selection] == SIX[2:]  # the data stages are up to date


def test_a_bad_cron_is_a_config_error_naming_the_key(write_config):
    from lora_pipeline.config.registry import load_config_file

    with pytest.raises(ConfigError, match=r"retrain.schedule.*'every monday' is not a cron expression"):
        load_config_file(write_config("micro", retrain={"schedule": "every monday"}))


def test_the_code_location_has_the_sensors_and_a_schedule_per_scheduled_config(monkeypatch, write_config, tmp_path):
    import importlib

    write_config("weekly", retrain={"schedule": "@weekly"})
    monkeypatch.setenv("LORA_PIPELINE_CONFIG_DIR", str(tmp_path / "configs"))
    import lora_pipeline.definitions as definitions

    try:
        reloaded = importlib.reload(definitions)
        assert {sensor.name for sensor in reloaded.defs.sensors} == {"model_configs", "dataset_changes", "dead_runs"}
        assert [schedule.name for schedule in reloaded.defs.schedules] == ["retrain_weekly"]
        reloaded.defs.resolve_all_job_defs()  # the schedule's job exists and validates
    finally:
        monkeypatch.undo()
        importlib.reload(definitions)  # as the other tests know it
