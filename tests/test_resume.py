"""trained_adapter across failures: retries reuse a finished adapter, changed inputs are not resumed, a diverged run keeps its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.assets import PIPELINE_ASSETS, formatted_dataset, quantized_base, raw_dataset, trained_adapter
from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.assets.training import what_changed

UPSTREAM = [raw_dataset, formatted_dataset, quantized_base]


def _instance():
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    return instance


def _train(fake_resources, instance, raise_on_error=True):
    """Materialize trained_adapter (and what it needs, unless already there) for the micro model."""
    return dg.materialize([*UPSTREAM, trained_adapter], selection=["trained_adapter"], partition_key="micro",
                          instance=instance, resources=fake_resources, raise_on_error=raise_on_error)


def _metadata(result, asset="trained_adapter"):
    materialization = result.asset_materializations_for_node(asset)[0]
    return {key: value.value for key, value in materialization.metadata.items()}


def _logs(instance, result):
    return [record.user_message for record in instance.all_logs(result.run_id)]


@pytest.mark.slow
def test_a_retry_reuses_the_finished_adapter_and_rewrites_nothing(write_config, fake_resources, monkeypatch):
    import lora_pipeline.assets.training as training

    write_config("micro", training={"checkpoint_every": 3})
    instance = _instance()
    assert dg.materialize(UPSTREAM, partition_key="micro", instance=instance, resources=fake_resources).success
    first = _train(fake_resources, instance)
    store = fake_resources["storage"]
    adapter = store.local_path(store.current("micro", "trained_adapter"))
    written = {path: path.stat().st_mtime_ns for path in Path(store.root, "micro", "trained_adapter").rglob("*")}
    assert not list(Path(store.root, "micro", "trained_adapter", ".checkpoints").glob("*"))  # superseded

    def must_not_train(*args, **kwargs):
        raise AssertionError("a retry with unchanged inputs trained again")

    monkeypatch.setattr(training, "train_adapter", must_not_train)
    again = _train(fake_resources, instance)
    assert _metadata(again)["reused"] is True and _metadata(first)["reused"] is False
    assert _metadata(again)["sha256"] == _metadata(first)["sha256"]
    per_run = {"reused", "wall_seconds"}  # what this materialization did, not what the adapter is
    assert {k: v for k, v in _metadata(again).items() if k not in per_run} == {
        k: v for k, v in _metadata(first).items() if k not in per_run}  # the same figures, from the artifact
    assert {path: path.stat().st_mtime_ns for path in written} == written  # not a byte rewritten
    assert any("reusing it instead of training again" in line for line in _logs(instance, again))
    assert (adapter / "adapter_model.safetensors").exists()


def test_checkpoints_made_from_other_inputs_are_not_resumed_and_the_log_says_what_changed(
        write_config, fake_resources):
    write_config("micro", training={"checkpoint_every": 2, "max_steps": 4})
    instance = _instance()
    assert dg.materialize(UPSTREAM, partition_key="micro", instance=instance, resources=fake_resources).success
    store = fake_resources["storage"]
    old_inputs = json.loads(json.dumps(_current_inputs(store)))
    old_inputs["training"]["learning_rate"] = 0.001
    old_inputs["data"] = "0123456789abcdef" * 4
    stale = Path(store.root) / "stale-checkpoint"
    stale.mkdir()
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    store.publish_checkpoint(stale, "micro", "trained_adapter", "aaaaaaaaaaaaaaaa", 2)
    store.record_checkpoint_inputs("micro", "trained_adapter", "aaaaaaaaaaaaaaaa", old_inputs)

    result = _train(fake_resources, instance)
    warning = next(line for line in _logs(instance, result) if "not resuming" in line)
    assert "step 2 of run aaaaaaaaaaaaaaaa" in warning
    assert "training.learning_rate: 0.001 -> 0.003" in warning
    assert "formatted_dataset holds other content (0123456789ab -> " in warning
    assert "training starts at step 0" in warning
    assert _metadata(result)["resumed_from_step"] == 0 and _metadata(result)["steps"] == 4
    # This run's checkpoints are superseded by its adapter; the other inputs' stay (a run of them, beside this
    # one, may be resuming from them) until they have been idle for a day.
    assert store.checkpoint_runs("micro", "trained_adapter") == ["aaaaaaaaaaaaaaaa"]
    folder = Path(store.root, "micro", "trained_adapter", ".checkpoints", "aaaaaaaaaaaaaaaa")
    for path in folder.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))  # written in 1970: abandoned
    assert store.drop_checkpoints("micro", "trained_adapter", "bbbbbbbbbbbbbbbb") == ["aaaaaaaaaaaaaaaa"]
    assert not store.checkpoint_runs("micro", "trained_adapter")


def _current_inputs(store):
    """The training inputs of the micro model as trained_adapter will compute them."""
    from lora_pipeline.assets.training import training_inputs
    from lora_pipeline.config.registry import validate_config
    from conftest import micro_config_data

    config = validate_config(micro_config_data(training={"checkpoint_every": 2, "max_steps": 4}), "test")
    return training_inputs(config, store, store.current("micro", "formatted_dataset"),
                           store.current("micro", "quantized_base"))


def test_what_changed_names_each_setting_and_the_data():
    before = {"data": "a" * 64, "base": "b" * 64, "training": {"learning_rate": 0.001, "seed": 0},
              "libraries": {"trl": "1.0.0"}}
    after = {"data": "c" * 64, "base": "b" * 64, "training": {"learning_rate": 0.002, "seed": 0},
             "libraries": {"trl": "1.1.0"}}
    assert what_changed(before, after) == [
        "formatted_dataset holds other content (aaaaaaaaaaaa -> cccccccccccc)",
        "libraries.trl: \"1.0.0\" -> \"1.1.0\"",
        "training.learning_rate: 0.001 -> 0.002",
    ]


def test_a_diverged_run_names_the_step_and_keeps_its_last_good_checkpoint(write_config, fake_resources):
    write_config("micro", training={"checkpoint_every": 1, "max_steps": 6, "learning_rate": 1e30,
                                    "max_grad_norm": 1e30})
    instance = _instance()
    result = dg.materialize(PIPELINE_ASSETS[:4], partition_key="micro", instance=instance, resources=fake_resources,
                            raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error.cause
    assert error.cls_name == "TrainingDivergedError"
    assert "the training loss is" in error.message and "The last good checkpoint, step" in error.message
    store = fake_resources["storage"]
    (run_key,) = store.checkpoint_runs("micro", "trained_adapter")
    kept = store.latest_checkpoint("micro", "trained_adapter", run_key)
    assert kept is not None and f"step {kept[0]}," in error.message
    assert not (Path(store.root) / "micro" / "trained_adapter" / "CURRENT.json").exists()
