"""Integrity under concurrency: one run's stages read only that run's outputs (issue 26)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore


def _ref(store_root, name: str) -> ArtifactRef:
    return ArtifactRef(uri=f"{store_root}/m/a/{name}", sha256=name * 4, size_bytes=1, files=1)


def test_a_run_reads_what_it_made_even_after_another_run_moves_current(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    mine, theirs = _ref(tmp_path, "aaaa"), _ref(tmp_path, "bbbb")
    store.record_run_ref("run-1", "m", "a", mine)
    store.point_current("m", "a", theirs)  # another run of the same model published after this one
    assert store.run_ref("run-1", "m", "a") == mine
    # A parent the run did not make is pinned at its first read: later stages of the run see the same version.
    assert store.run_ref("run-2", "m", "a") == theirs
    store.point_current("m", "a", mine)
    assert store.run_ref("run-2", "m", "a") == theirs
    assert store.run_ref("run-3", "m", "a") == mine


def _run(config, tmp_path, seed: int) -> subprocess.Popen:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    return subprocess.Popen([sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--json",
                             "--set", f"training.seed={seed}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _lineage(uri: str) -> dict:
    return json.loads((Path(uri) / "LINEAGE.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(8, 9), (8, 8)])
def test_two_runs_of_one_model_started_together_each_read_their_own_stages(tmp_path, write_config, seeds):
    """Seeds 8 and 9 at once on one store and instance: either the second stops at once with the documented
    message (a stage lock held by the first), or their steps take turns and each run's merge, evaluation and
    champion decision are of its own adapter, never the other's."""
    config = write_config("micro", quantization={"mode": "none"}, training={"max_steps": 4})
    (tmp_path / "dagster_home").mkdir()
    runs = {index: _run(config, tmp_path, seed) for index, seed in enumerate(seeds)}
    summaries = {}
    for seed, process in runs.items():
        out, err = process.communicate(timeout=1500)
        if process.returncode == 2:  # the documented stop: a stage of this model was being written by the other run
            assert "is being written by run" in err and "this run stops instead of interleaving" in err, err[-3000:]
            continue
        assert process.returncode in (0, 3), err[-3000:]  # 3: a gate refused (the other run's champion is better)
        summaries[seed] = json.loads(out.strip().splitlines()[-1])
    assert summaries, "neither run completed"
    adapters = {seed: summary["assets"]["trained_adapter"]["uri"] for seed, summary in summaries.items()}
    # Different seeds make different adapters; the same seed twice makes one (the second reuses or remakes it).
    assert len(set(adapters.values())) == (len(adapters) if seeds[0] != seeds[1] else 1)
    for seed, summary in summaries.items():
        assets = summary["assets"]
        merged = _lineage(assets["merged_model"]["uri"])
        assert merged["parents"]["trained_adapter"]["uri"] == adapters[seed]
        report = _lineage(assets["eval_report"]["uri"])
        assert report["parents"]["trained_adapter"]["uri"] == adapters[seed]
        assert report["parents"]["merged_model"]["uri"] == assets["merged_model"]["uri"]
        assert summary["champion"]["candidate"] == adapters[seed].rstrip("/").rsplit("/", 1)[-1]


ALIAS_BOMB = """a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_a_yaml_alias_bomb_is_refused_naming_the_file_and_the_alias(tmp_path):
    from lora_pipeline.config.registry import load_config_file
    from lora_pipeline.errors import ConfigError

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match=r"bomb.yaml: invalid YAML at line 2.*alias \*a.*not accepted"):
        load_config_file(path)
    with pytest.raises(ConfigError, match=r"--set 'lora.r=\[\*x\]'"):
        load_config_file(_good(tmp_path), ["lora.r=[*x]"])


def _good(tmp_path) -> Path:
    import yaml

    from conftest import micro_config_data

    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(micro_config_data()))
    return path


def test_a_huge_config_file_is_refused_before_it_is_parsed(tmp_path):
    from lora_pipeline.config.registry import MAX_CONFIG_BYTES, load_config_file
    from lora_pipeline.errors import ConfigError

    path = tmp_path / "huge.yaml"
    path.write_text("base_model: x\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"huge.yaml: [\d,]+ bytes is more than a config file may have"):
        load_config_file(path)


@pytest.mark.parametrize("name", ["a..b", ".hidden", "-x", "Upper"])
def test_a_model_name_the_store_would_refuse_is_refused_where_the_config_becomes_a_partition(tmp_path, name):
    from lora_pipeline.config.registry import ConfigRegistry, is_model_key, partition_key_for
    from lora_pipeline.errors import ConfigError

    assert not is_model_key(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(_good(tmp_path).read_text())
    with pytest.raises(ConfigError, match="is not a valid model key"):
        partition_key_for(path)
    registry = ConfigRegistry(tmp_path)
    assert registry.keys == ["good"] and path.resolve() in registry.problems


def test_one_bad_file_in_configs_never_stops_list_for_the_others(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "good.yaml").write_text(_good(tmp_path).read_text())
    (configs / "bomb.yaml").write_text(ALIAS_BOMB)
    (configs / "a..b.yaml").write_text(_good(tmp_path).read_text())
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store"),
           "LORA_PIPELINE_CONFIG_DIR": str(configs)}
    (tmp_path / "home").mkdir()
    listed = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "list", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [row["model"] for row in json.loads(listed.stdout.strip().splitlines()[-1])] == ["good"]
    assert "bomb.yaml is not listed" in listed.stderr and "alias" in listed.stderr
    assert "a..b.yaml is not listed" in listed.stderr


@pytest.mark.slow
def test_two_concurrent_runs_each_report_their_own_failure(tmp_path, write_config):
    """One refused by a champion gate (exit 3, the gate named), one failing its data (exit 2, max_length named)."""
    refused = write_config("refused", quantization={"mode": "none"}, training={"max_steps": 2},
                           promotion={"min_improvement": 100.0})
    bad_data = write_config("bad-data", training={"max_length": 8}, dataset={"max_truncation_rate": 0.0})
    (tmp_path / "dagster_home").mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    processes = {name: subprocess.Popen([sys.executable, "-m", "lora_pipeline.cli", "run", str(path)], cwd=REPO,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name, path in (("refused", refused), ("bad-data", bad_data))}
    results = {name: (process.wait(timeout=1500), process.communicate()) for name, process in processes.items()}
    code, (out, err) = results["refused"]
    assert code == 3, err[-3000:]
    assert "better_than_base" in out + err
    code, (out, err) = results["bad-data"]
    assert code == 2 and "max_length" in err and "better_than_base" not in err, err[-3000:]  # a user error: 2


def test_a_killed_ui_launched_run_gives_its_gpu_slot_back(tmp_path):
    """A run worker started by the UI (DefaultRunLauncher), SIGKILLed while it held the `gpu` pool's slot: the
    dead_runs sensor marks the run failed and frees the slot, so runs queued behind it start."""
    import signal

    import dagster as dg
    from dagster._core.test_utils import instance_for_test

    from lora_pipeline.reclaim import dead_runs

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with instance_for_test(temp_dir=str(tmp_path)) as instance:
        run = instance.add_run(dg.DagsterRun(job_name="tune", run_id="a" * 8 + "-0000-0000-0000-" + "0" * 12,
                                             status=dg.DagsterRunStatus.STARTED))
        # What the run worker logs when it starts (dagster's api execute_run), and its claim on the pool.
        instance.report_engine_event(f"Started process for run (pid: {worker.pid}).", run)
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", run.run_id, "trained_adapter").is_claimed
        context = dg.build_sensor_context(instance=instance)
        assert "no run of this machine lost its process" in dead_runs(context).skip_message
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # alive: left alone
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert f"pid {worker.pid} is gone" in dead_runs(context).skip_message
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert storage.get_concurrency_info("gpu").active_slot_count == 0


def test_a_local_base_folder_is_versioned_by_its_files_not_its_path(tmp_path):
    """Rebuilding a base in the same folder (new config or weights) must redo what was made from it."""
    from conftest import micro_config_data
    from lora_pipeline.assets.stages import pipeline
    from lora_pipeline.config.registry import validate_config

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"num_key_value_heads": 1}')
    (base / "model.safetensors").write_bytes(b"weights")
    model_config = validate_config({**micro_config_data(), "base_model": str(base)}, "test")
    reads = pipeline()["quantized_base"].reads
    before = reads.of(model_config)["base_model"]
    assert before.startswith(str(base) + "@") and reads.of(model_config)["base_model"] == before
    (base / "config.json").write_text('{"num_key_value_heads": 2}')
    assert reads.of(model_config)["base_model"] != before


def _published(store: ArtifactStore, tmp_path) -> ArtifactRef:
    """A small raw_dataset artifact of model m, published."""
    folder = tmp_path / "made"
    folder.mkdir()
    (folder / "rows.parquet").write_text("rows")
    return store.publish(folder, "m", "raw_dataset")


def test_a_pointer_that_leaves_the_store_is_refused(tmp_path):
    from lora_pipeline.resources.artifacts import ArtifactIntegrityError

    store = ArtifactStore(root=str(tmp_path / "store"))
    ref = _published(store, tmp_path)
    assert store.local_path(store.current("m", "raw_dataset")) == Path(ref.uri)
    outside = tmp_path / "outside"
    outside.mkdir()
    for uri in (str(outside), f"{tmp_path / 'store'}/../outside", "/etc"):
        store.point_current("m", "raw_dataset", ArtifactRef(uri=uri, sha256=ref.sha256, size_bytes=1, files=1))
        with pytest.raises(ArtifactIntegrityError, match="is outside the store"):
            store.local_path(store.current("m", "raw_dataset"))
    # A copied store keeps pointers to the original's files: refused, not silently read from there.
    store.point_current("m", "raw_dataset", ref)
    import shutil

    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    copy = ArtifactStore(root=str(tmp_path / "copy"))
    with pytest.raises(ArtifactIntegrityError, match="is outside the store"):
        copy.local_path(copy.current("m", "raw_dataset"))


def test_a_full_disk_while_publishing_a_pointer_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    store = ArtifactStore(root=str(tmp_path / "store"))
    ref = _ref(tmp_path / "store", "aaaa")
    store.point_current("m", "a", ref)
    real_write = Path.write_bytes

    def full(self, data):
        real_write(self, data[: len(data) // 2])  # part of it reached the disk, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        store.point_current("m", "a", _ref(tmp_path / "store", "bbbb"))
    monkeypatch.undo()
    folder = tmp_path / "store" / "m" / "a"
    assert sorted(path.name for path in folder.iterdir()) == ["CURRENT.json"]
    assert store.current("m", "a") == ref  # the old pointer, whole


def test_what_a_killed_writer_left_is_removed_by_the_next_writer_at_once(tmp_path):
    import socket

    store = ArtifactStore(root=str(tmp_path / "store"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{socket.gethostname()}-{dead.pid}-0123abcd"
    staging = tmp_path / "store" / ".staging"
    (staging / tag).mkdir(parents=True)
    (staging / tag / "model.safetensors").write_bytes(b"\0" * 1024)
    alive = f"{socket.gethostname()}-{os.getpid()}-0123abcd"
    (staging / alive).mkdir()
    store.point_current("m", "a", _ref(tmp_path / "store", "aaaa"))
    leftover = tmp_path / "store" / "m" / "a" / f"CURRENT.json.partial-{tag}"
    leftover.write_text("half")
    with store.staging_dir():
        pass
    store.point_current("m", "a", _ref(tmp_path / "store", "bbbb"))
    assert not (staging / tag).exists() and (staging / alive).exists()  # a live writer's work stays
    assert not leftover.exists()


def test_an_adapter_whose_weights_are_only_a_pickle_is_refused_before_torch_sees_it(tmp_path):
    import torch

    from lora_pipeline.errors import ModelError
    from lora_pipeline.ml.adapters import attach_adapters
    from lora_pipeline.ml.base.loading import require_safetensors_adapter

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    torch.save({"weights": torch.zeros(1)}, folder / "adapter_model.bin")
    with pytest.raises(ModelError, match=r"adapter's weights are a pickle \(adapter_model.bin\).*allow_pickle"):
        attach_adapters(torch.nn.Linear(1, 1), {"hostile": folder})
    require_safetensors_adapter(folder, allow_pickle=True)  # the opt-in: PEFT then loads it weights_only


def test_a_symlink_out_of_the_dataset_folder_is_refused_unless_allowed(tmp_path):
    from lora_pipeline.errors import DataError
    from lora_pipeline.ml.data.raw import load_dataset
    from conftest import dataset_settings

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "passwd.txt").symlink_to(secret)
    (folder / "inside.jsonl").symlink_to(folder / "good.jsonl")  # a link that stays inside is followed
    for source in (str(folder), str(folder / "*.txt"), str(folder / "passwd.txt")):
        with pytest.raises(DataError, match=r"passwd.txt: a symlink to .*secret.txt, outside the dataset's folder"):
            load_dataset(dataset_settings(source=source))
    assert load_dataset(dataset_settings(source=str(folder / "*.jsonl"))).frame.shape[0] == 2
    rows = load_dataset(dataset_settings(source=str(folder / "passwd.txt"), follow_symlinks=True))
    assert "root:x" in rows.frame.iloc[0, 0]


@pytest.mark.parametrize("problem", ["remote code", "pickle"])
def test_validate_refuses_the_base_run_refuses_with_the_same_message(tmp_path, problem, micro_base):
    import shutil

    import yaml

    from conftest import micro_config_data

    base = tmp_path / "base"
    shutil.copytree(micro_base, base)
    if problem == "remote code":
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
        expected = "has an auto_map (x.Model), so loading it runs Python code"
    else:
        (base / "model.safetensors").rename(base / "pytorch_model.bin")
        expected = "only pickle weights (pytorch_model.bin)"
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({**micro_config_data(), "base_model": str(base)}))
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    messages = []
    for command in ("validate", "run"):
        done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", command, str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode != 0 and expected in done.stderr, done.stderr[-2000:]
        messages.append(next(line for line in done.stderr.splitlines() if expected in line))
    assert messages[0].split("base_model")[1] == messages[1].split("base_model")[1]


def test_current_pointers_move_forward_only_in_run_order(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    first, second = _ref(tmp_path / "store", "aaaa"), _ref(tmp_path / "store", "bbbb")
    assert store.point_current("m", "a", second, run_order=200.0)
    # The run launched earlier (order 100) publishes after the later one: the later one's version stays current.
    assert not store.point_current("m", "a", first, run_order=100.0)
    assert store.current("m", "a") == second
    assert store.point_current("m", "a", first, run_order=300.0) and store.current("m", "a") == first
    assert store.point_current("m", "a", second)  # no order (a reuse, a rollback): moves as before
    assert store.current("m", "a") == second


STAGES = ("raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report")


@pytest.mark.slow
def test_a_run_killed_at_every_stage_boundary_leaves_a_consistent_store_and_finishes_when_run_again(
        tmp_path, write_config):
    """SIGKILL right after each stage publishes, then launch again: each launch goes on from there, the
    killed writer's leftovers are gone once the next one writes, and the store checks out at the end."""
    import signal

    from lora_pipeline.resources.store_check import store_problems

    config = write_config("micro", training={"max_steps": 4})
    (tmp_path / "dagster_home").mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store"),
           "PYTHONUNBUFFERED": "1"}
    store = ArtifactStore(root=str(tmp_path / "store"))
    for stage in STAGES:
        process = subprocess.Popen([sys.executable, "-m", "lora_pipeline.cli", "run", str(config)], cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in process.stdout:
            seen.append(line)
            if f'Finished execution of step "{stage}"' in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=600)
        assert process.returncode == -signal.SIGKILL, \
            f"the run ended ({process.returncode}) before {stage} finished:\n" + "".join(seen[-40:])
        # Only what a killed writer may leave until the next one writes: staging folders and partial files.
        assert all("writer that is gone" in problem for problem in store_problems(store)), store_problems(store)
    done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(STAGES) <= set(summary["assets"]) and summary["champion"]["promoted"]
    assert store_problems(store) == []


def test_the_store_check_finds_every_kind_of_damage(tmp_path):
    import socket

    from lora_pipeline.resources.store_check import store_problems

    store = ArtifactStore(root=str(tmp_path / "store"))
    ref = _published(store, tmp_path)
    assert store_problems(store) == []
    (Path(ref.uri) / "rows.parquet").write_text("ROWS")  # corrupted, same size
    (tmp_path / "store" / "m" / "raw_dataset" / "0123456789abcdef").mkdir()  # half-published
    store.point_current("m", "other", ArtifactRef(uri="/etc", sha256="0" * 64, size_bytes=1, files=1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "store" / ".staging" / f"{socket.gethostname()}-{dead.pid}-0123abcd").mkdir(parents=True)
    problems = "\n".join(store_problems(store))
    assert "rows.parquet does not match its sha256" in problems
    assert "0123456789abcdef: a version folder without MANIFEST.json" in problems
    assert "other/CURRENT.json: points outside the store (/etc)" in problems
    assert "a staging folder of a writer that is gone" in problems


@pytest.mark.parametrize("failing_write", [0, 1, 2])
def test_a_full_disk_at_any_write_of_a_publish_leaves_a_consistent_store_and_the_retry_publishes(
        tmp_path, monkeypatch, failing_write):
    """The writes of publishing a stage: its files into staging, the manifest, the pointer. Whichever meets a
    full disk, the store checks out afterwards and publishing again succeeds."""
    import errno

    from lora_pipeline.resources.store_check import store_problems

    store = ArtifactStore(root=str(tmp_path / "store"))
    real_text, real_bytes = Path.write_text, Path.write_bytes
    writes = {"count": 0}

    def counted(real):
        def write(self, data, *args, **kwargs):
            if writes["count"] == failing_write:
                writes["count"] += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            writes["count"] += 1
            return real(self, data, *args, **kwargs)
        return write

    def publish_once():
        with store.staging_dir() as staging:
            (staging / "weights.safetensors").write_bytes(b"\1" * 4096)
            return store.publish(staging, "m", "trained_adapter")

    monkeypatch.setattr(Path, "write_text", counted(real_text))
    monkeypatch.setattr(Path, "write_bytes", counted(real_bytes))
    with pytest.raises(OSError, match="No space left"):
        publish_once()
    monkeypatch.undo()
    assert store_problems(store) == []
    ref = publish_once()
    assert store.current("m", "trained_adapter") == ref and store_problems(store) == []
