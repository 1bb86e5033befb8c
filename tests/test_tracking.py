"""Experiment tracking: the config section, the Trainer's report_to, and MLflow against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from conftest import REPO, micro_config_data


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend, proxied artifacts in a temp folder)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(folder / "server.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _client(url: str):
    from lora_pipeline.ml.tracking import import_mlflow

    return import_mlflow(url).MlflowClient(tracking_uri=url, registry_uri=url)


def _materialize(resources, assets, partition: str):
    from lora_pipeline.assets.common import MODEL_PARTITIONS

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, [partition])
    result = dg.materialize(assets, partition_key=partition, instance=instance, resources=resources)
    assert result.success
    return result


def _metadata(result, asset: str) -> dict:
    materialization = result.asset_materializations_for_node(asset)[0]
    return {key: value.value for key, value in materialization.metadata.items()}


def test_tracking_is_no_part_of_any_stage_settings():
    """Turning a tracker on redoes nothing: no stage's settings version reads the tracking section."""
    from lora_pipeline.assets.provenance import stage_settings_versions
    from lora_pipeline.config.schema import ModelConfig

    quiet = ModelConfig(**micro_config_data())
    tracked = ModelConfig(**micro_config_data(tracking={"report_to": ["mlflow", "tensorboard"], "experiment": "x",
                                                        "tracking_uri": "http://127.0.0.1:1"}))
    assert quiet.canonical_hash() != tracked.canonical_hash()
    assert stage_settings_versions(quiet, "source") == stage_settings_versions(tracked, "source")


def test_report_to_takes_the_trainers_names_and_reaches_its_arguments(tmp_path, monkeypatch):
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from lora_pipeline.config.downstream import TRAINER_INTEGRATIONS
    from lora_pipeline.config.schema import ModelConfig, TrackingSettings, TrainingSettings
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.tracking import default_tracking_uri
    from lora_pipeline.ml.training.trainer import StepOptions, _trainer_arguments

    assert set(TRAINER_INTEGRATIONS) == set(INTEGRATION_TO_CALLBACK)
    assert TrackingSettings(report_to="mlflow, tensorboard").report_to == ["mlflow", "tensorboard"]
    for wrong in ({"report_to": ["all"]}, {"report_to": ["mlfow"]},
                  {"report_to": ["mlflow"], "log_model": False}):  # registering needs the logged model
        with pytest.raises(ValueError):
            ModelConfig(**micro_config_data(tracking=wrong))
    assert ModelConfig(**micro_config_data()).tracking.report_to == []  # off by default

    def arguments(report_to):
        return _trainer_arguments(TrainingSettings(), tmp_path, DeviceInfo(device="cpu"), "fp32", False, StepOptions(),
                                  report_to)
    assert arguments(()).report_to == [] and arguments(("tensorboard",)).report_to == ["tensorboard"]

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert default_tracking_uri() == "http://tracking.example:5000"


def test_by_default_runs_go_to_a_sqlite_file_in_the_dagster_home_with_telemetry_off(tmp_path, monkeypatch):
    """No URI anywhere: $DAGSTER_HOME/mlflow.db, artifacts beside it (never ./mlruns); a failed training's run
    says so."""
    from lora_pipeline.config.schema import TrackingSettings
    from lora_pipeline.resources import ExperimentTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    settings = TrackingSettings(report_to=["mlflow"], experiment="exp")
    live = ExperimentTracker().start_training(settings, "micro", "micro", {"model": "micro", "dagster_run_id": "r1",
                                                                         "config": micro_config_data()})
    live.log(2, {"loss": 3.5, "learning_rate": 1e-3, "epoch": 0.5, "note": "text is not a metric"})
    live.fail()

    import mlflow.telemetry

    assert mlflow.telemetry.get_telemetry_client() is None and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    client = _client(uri)
    experiment = client.get_experiment_by_name("exp")
    assert experiment.artifact_location == (tmp_path / "home" / "mlflow-artifacts" / "exp").as_uri()
    run = client.get_run(live.run.run_id)
    assert run.info.status == "FAILED" and run.data.tags["dagster.run_id"] == "r1"
    assert run.data.metrics == {"train/loss": 3.5, "train/learning_rate": 1e-3, "train/epoch": 0.5}
    assert run.data.params["lora.r"] == "8" and run.data.params["base_model"] == "builtin:micro-llama"
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.slow
def test_with_tracking_off_nothing_contacts_mlflow(write_config, fake_resources, mlflow_server, monkeypatch):
    """The default config, with the real tracker and MLFLOW_TRACKING_URI both pointing at a live server:
    training leaves no trace there (no experiment, no run) and no MLflow link in the metadata."""
    from lora_pipeline.assets import formatted_dataset, quantized_base, raw_dataset, trained_adapter
    from lora_pipeline.resources import ExperimentTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_config("quiet")
    resources = {**fake_resources, "tracker": ExperimentTracker(tracking_uri=mlflow_server)}
    result = _materialize(resources, [raw_dataset, formatted_dataset, quantized_base, trained_adapter], "quiet")
    assert not any(key.startswith("mlflow") for key in _metadata(result, "trained_adapter"))
    client = _client(mlflow_server)
    assert [experiment.name for experiment in client.search_experiments()] == ["Default"]
    assert client.search_runs(["0"]) == []


@pytest.mark.slow
def test_one_mlflow_run_per_adapter_with_curves_metrics_model_and_aliases(write_config, fake_resources, mlflow_server,
                                                                         monkeypatch, capsys):
    """The whole pipeline reporting to a live MLflow server: one run for the adapter, tagged with the Dagster run,
    the partition and the data versions, with the training curve and the evaluation's metrics, linked from the
    metadata; the adapter registered, challenger then champion; loaded back by alias in a process without the hub;
    a rollback moves the alias back."""
    from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
    from lora_pipeline.ml.tracking import ADAPTER_TAG
    from lora_pipeline.resources import ExperimentTracker

    config_path = write_config("micro", tracking={"report_to": ["mlflow"], "tracking_uri": mlflow_server},
                               training={"eval_steps": 4})
    resources = {**fake_resources, "tracker": ExperimentTracker()}
    result = _materialize(resources, [*PIPELINE_ASSETS, *PIPELINE_CHECKS], "micro")
    adapter, report, champion = (_metadata(result, name) for name in ("trained_adapter", "eval_report", "champion"))
    assert champion["promoted"]

    client = _client(mlflow_server)
    experiment = client.get_experiment_by_name("micro")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert adapter["mlflow_run_id"] == report["mlflow_run_id"] == champion["mlflow_run_id"] == run.info.run_id
    assert adapter["mlflow_run_url"].startswith(mlflow_server) and run.info.run_id in adapter["mlflow_run_url"]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["dagster.run_id"] == result.run_id and tags["dagster.partition"] == "micro"
    adapter_dir = Path(adapter["uri"])
    lineage = json.loads((adapter_dir / "LINEAGE.json").read_text())
    for parent in ("formatted_dataset", "quantized_base"):
        assert tags[f"lora_pipeline.{parent}"] == lineage["parents"][parent]["version"]
    assert tags["lora_pipeline.source_version"] == lineage["source_version"]
    assert tags[ADAPTER_TAG] == adapter["sha256"]
    assert run.data.params["lora.r"] == "8" and run.data.params["training.max_steps"] == "8"

    # The Trainer's curve, live at its logging steps (every 2 of 8), and the evaluation beside it.
    curve = client.get_metric_history(run.info.run_id, "train/loss")
    assert [point.step for point in curve] == [2, 4, 6, 8]
    summary = json.loads((adapter_dir / "training_summary.json").read_text())
    assert [(point.step, point.value) for point in curve] == [tuple(entry) for entry in summary["loss_history"]]
    assert "train/learning_rate" in run.data.metrics
    # The held-out loss while training (training.eval_steps 4), on the same steps as the training curve.
    held_out = client.get_metric_history(run.info.run_id, "train/eval_loss")
    assert [(point.step, point.value) for point in held_out] == [tuple(entry) for entry in summary["eval_history"]]
    assert [point.step for point in held_out] == [4, 8]
    assert run.data.metrics["eval/adapter_loss"] == pytest.approx(report["adapter_loss"])
    assert run.data.metrics["eval/base_loss"] == pytest.approx(report["base_loss"])

    # Registered once; the aliases follow evaluation and promotion.
    versions = client.search_model_versions("name = 'micro'")
    assert [version.version for version in versions] == ["1"] and versions[0].run_id == run.info.run_id
    assert set(client.get_registered_model("micro").aliases) == {"challenger", "champion"}
    assert champion["mlflow_champion"] == "models:/micro@champion"

    # The same adapter again (reused, not retrained): the same run, not a second one.
    again = _materialize(resources, [*PIPELINE_ASSETS, *PIPELINE_CHECKS][:4], "micro")
    assert _metadata(again, "trained_adapter")["reused"]
    assert _metadata(again, "trained_adapter")["mlflow_run_id"] == run.info.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 1

    # Loaded back by alias in a fresh process with the hub off: base by local path, the adapter's own weights.
    probe = (
        "import json, sys, mlflow, torch\n"
        "from safetensors.torch import load_file\n"
        "parts = mlflow.transformers.load_model('models:/micro@champion', return_type='components')\n"
        "model = parts['model']\n"
        "saved = load_file(sys.argv[1] + '/adapter_model.safetensors')\n"
        "state = {k: v for k, v in model.state_dict().items() if 'lora_' in k}\n"
        "close = [torch.allclose(v, saved[k.replace('.default', '')]) for k, v in state.items()]\n"
        "print(json.dumps({'type': type(model).__name__, 'lora': len(state), 'equal': all(close)}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", probe, str(adapter_dir)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["type"].startswith("PeftModel") and loaded["lora"] > 0 and loaded["equal"]

    # A newer champion (registered as version 2, the alias moved to it), then `lora-pipeline rollback`: the
    # alias follows the champion history back to the first adapter's version.
    from lora_pipeline.cli import main
    from lora_pipeline.resources.records import ChampionHistory

    history = ChampionHistory(resources["storage"], "micro")
    first = history.current()
    other_run = client.create_run(experiment.experiment_id).info.run_id
    newer = client.create_model_version("micro", f"runs:/{other_run}/model", other_run)
    client.set_registered_model_alias("micro", "champion", newer.version)
    history.append("promote", "bbbb2222bbbb2222", first.candidate, first.suite, first.gates, None, "micro")
    monkeypatch.setenv("LORA_PIPELINE_CONFIG_DIR", str(config_path.parent))
    assert main(["rollback", "micro", "--storage", resources["storage"].root, "--json"]) == 0
    back = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert back["version"] == first.version and back["mlflow_model_version"] == "1"
    assert client.get_model_version_by_alias("micro", "champion").version == "1"


@pytest.mark.slow
def test_a_distributed_training_reaches_its_mlflow_run_from_rank_0(write_config, fake_resources, mlflow_server):
    """With two torchrun ranks the Trainer's logs come back from rank 0 through Pipes into the same kind of run."""
    from lora_pipeline.assets import PIPELINE_ASSETS
    from lora_pipeline.resources import ExperimentTracker

    write_config("micro", quantization={"mode": "none"}, tracking={"report_to": ["mlflow"], "tracking_uri": mlflow_server},
                 training={"distributed": {"nproc_per_node": 2}})
    wanted = ("raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter")
    result = _materialize({**fake_resources, "tracker": ExperimentTracker()},
                          [a for a in PIPELINE_ASSETS if a.key.path[-1] in wanted], "micro")
    adapter = _metadata(result, "trained_adapter")
    assert adapter["world_size"] == 2
    curve = _client(mlflow_server).get_metric_history(adapter["mlflow_run_id"], "train/loss")
    summary = json.loads((Path(adapter["uri"]) / "training_summary.json").read_text())
    assert [(point.step, point.value) for point in curve] == [tuple(entry) for entry in summary["loss_history"]]
    assert [point.step for point in curve] == [2, 4, 6, 8]
