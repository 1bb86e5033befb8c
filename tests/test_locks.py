"""One writer per asset partition: locally (flock) and on S3 (conditional writes), and through the assets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.resources import ArtifactStore
from lora_pipeline.resources.locks import ConcurrentWriteError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hold_in_a_subprocess(root: str) -> subprocess.Popen:
    """Another process that takes the lock of micro/trained_adapter and keeps it until killed."""
    code = (
        "import sys, time\n"
        "from lora_pipeline.resources import ArtifactStore\n"
        f"with ArtifactStore(root={root!r}).writer_lock('micro', 'trained_adapter', 'run-elsewhere'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ})
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_of_the_same_asset_partition_is_refused_naming_the_first(where, tmp_path, request):
    if where == "s3":
        bucket, _ = request.getfixturevalue("s3_bucket")
        root = f"s3://{bucket}/store"
    else:
        root = str(tmp_path / "store")
    store = ArtifactStore(root=root, cache_dir=str(tmp_path / "cache"))
    holder = _hold_in_a_subprocess(root)
    try:
        with pytest.raises(ConcurrentWriteError, match=r"trained_adapter of model 'micro' is being written by run "
                           rf"run-elsewhere \(pid {holder.pid} on host .*\); this run stops"):
            with store.writer_lock("micro", "trained_adapter", "run-here"):
                pass
        with store.writer_lock("micro", "merged_model", "run-here"):  # other assets and partitions are free
            with store.writer_lock("other", "trained_adapter", "run-here"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to release it: the lock must still come free
        holder.wait()
    with store.writer_lock("micro", "trained_adapter", "run-here"):
        with pytest.raises(ConcurrentWriteError, match="run run-here"):  # and is exclusive again
            with store.writer_lock("micro", "trained_adapter", "run-again"):
                pass


def test_on_s3_a_lock_is_released_on_exit_and_a_silent_holder_elsewhere_expires(s3_bucket, tmp_path):
    from lora_pipeline.resources import locks

    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    lock = f"{bucket}/store/.locks/micro/trained_adapter.lock"
    with store.writer_lock("micro", "trained_adapter", "run-1"):
        assert json.loads(fs.cat_file(lock))["run_id"] == "run-1"
    fs.invalidate_cache()
    assert not fs.exists(lock)

    beating_elsewhere = {"run_id": "run-on-another-pod", "host": "another-pod", "pid": 1, "since": time.time(),
                         "heartbeat": time.time()}
    fs.pipe_file(lock, json.dumps(beating_elsewhere).encode())
    with pytest.raises(ConcurrentWriteError, match="run-on-another-pod"):
        with store.writer_lock("micro", "trained_adapter", "run-2"):
            pass
    silent = {**beating_elsewhere, "heartbeat": time.time() - locks.STALE_SECONDS - 1}
    fs.pipe_file(lock, json.dumps(silent).encode())
    with store.writer_lock("micro", "trained_adapter", "run-2"):
        fs.invalidate_cache()
        assert json.loads(fs.cat_file(lock))["run_id"] == "run-2"


def test_on_s3_the_heartbeat_keeps_a_long_writer_from_expiring(s3_bucket, tmp_path, monkeypatch):
    from lora_pipeline.resources import locks

    monkeypatch.setattr(locks, "HEARTBEAT_SECONDS", 0.2)
    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    lock = f"{bucket}/store/.locks/micro/trained_adapter.lock"
    with store.writer_lock("micro", "trained_adapter", "run-1"):
        first = json.loads(fs.cat_file(lock))["heartbeat"]
        time.sleep(1.0)
        fs.invalidate_cache()
        assert json.loads(fs.cat_file(lock))["heartbeat"] > first


def test_a_run_finding_its_asset_partition_locked_fails_clearly_and_publishes_nothing(write_config, fake_resources):
    import dagster as dg

    from lora_pipeline.assets import raw_dataset
    from lora_pipeline.assets.common import MODEL_PARTITIONS

    write_config("micro")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    store = fake_resources["storage"]
    with store.writer_lock("micro", "raw_dataset", "the-first-run"):
        result = dg.materialize([raw_dataset], partition_key="micro", instance=instance, resources=fake_resources,
                                raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    error = failure.event_specific_data.error
    assert error.cause.cls_name == "ConcurrentWriteError"
    assert "raw_dataset of model 'micro' is being written by run the-first-run" in error.cause.message
    assert not (Path(store.root) / "micro" / "raw_dataset" / "CURRENT.json").exists()
    assert dg.materialize([raw_dataset], partition_key="micro", instance=instance, resources=fake_resources).success


@pytest.mark.slow
def test_two_partitions_run_at_the_same_time_without_touching_each_other(tmp_path, write_config):
    """Two CLI runs of different models on one store and one Dagster instance, started together:
    separate files, and the `gpu` pool makes their model stages take turns."""
    configs = {
        "alpha": write_config("alpha", training={"max_steps": 6, "seed": 1}),
        "beta": write_config("beta", training={"max_steps": 6, "seed": 2}, lora={"r": 4}),
    }
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lora_pipeline.cli", "run", str(path), "--storage", str(tmp_path / "store"),
             "--json"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, path in configs.items()
    }
    summaries, errors = {}, {}
    for name, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        summaries[name], errors[name] = json.loads(out.strip().splitlines()[-1]), err
    store = ArtifactStore(root=str(tmp_path / "store"))
    for name, summary in summaries.items():
        assert summary["assets"]["trained_adapter"]["metadata"]["steps"] == 6
        for asset, produced in summary["assets"].items():
            assert produced["uri"].startswith(str(tmp_path / "store" / name / asset)), produced["uri"]
            store.local_path(store.current(name, asset))  # every file matches its manifest
    adapters = [json.loads((tmp_path / "store" / name / "trained_adapter" / "CURRENT.json").read_text())["sha256"]
                for name in configs]
    assert adapters[0] != adapters[1]
    # Without a GPU the instance's `gpu` pool has one slot: the two runs took turns on the model stages.
    assert "default_limit: 1" in (tmp_path / "dagster_home" / "dagster.yaml").read_text()
    busy = _gpu_stage_intervals(tmp_path / "dagster_home", [summary["run_id"] for summary in summaries.values()])
    (first_run, first), (second_run, second) = sorted(busy.items())
    assert all(end <= other_start or other_end <= start
               for start, end, _ in first for other_start, other_end, _ in second), busy
    # The run that waited said so, and who held the slot (its model and step).
    said = {name: [line for line in errors[name].splitlines() if "waits for the gpu pool (1 slot): held by run" in line]
            for name in configs}
    assert any(said.values()), errors
    # The time it waited is given apart from its own time, in the summary and the line that ends the run.
    waited = {name: summary["pool_wait_seconds"] for name, summary in summaries.items()}
    assert all(waited[name] >= 1 for name in configs if said[name]), (waited, said)
    assert any("s waiting for the gpu pool)" in errors[name] for name in configs if said[name])
    for name, lines in said.items():
        other = next(key for key in configs if key != name)
        assert all(f"{summaries[other]['run_id'][:8]} (model {other}, step " in line for line in lines), lines


def _gpu_stage_intervals(home: Path, run_ids: list[str]) -> dict[str, list[tuple[float, float, str]]]:
    """When each run's gpu-pool stages ran: from the instance's event log."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    from lora_pipeline.assets.common import GPU_POOL
    from lora_pipeline.assets import PIPELINE_ASSETS

    gpu_steps = {asset.key.path[-1] for asset in PIPELINE_ASSETS if asset.op.pool == GPU_POOL}
    # The champion stage may score the current champion on the model too.
    assert gpu_steps == {"quantized_base", "trained_adapter", "merged_model", "eval_report", "champion"}
    intervals = {}
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        for run_id in run_ids:
            started, ended = {}, {}
            for entry in instance.all_logs(run_id):
                event = entry.dagster_event
                if event is None or event.step_key not in gpu_steps:
                    continue
                if event.event_type_value == "STEP_START":
                    started[event.step_key] = entry.timestamp
                elif event.event_type_value == "STEP_SUCCESS":
                    ended[event.step_key] = entry.timestamp
            assert set(started) == set(ended) == gpu_steps
            intervals[run_id] = [(round(started[step], 2), round(ended[step], 2), step) for step in gpu_steps]
    return intervals
