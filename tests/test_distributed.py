"""Distributed training on the CPU with the gloo backend: torchrun ranks match one process, the Pipes launch from
trained_adapter, a failing rank, cancellation, two torchrun agents rendezvousing on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.base.precision import DeviceInfo
from lora_pipeline.ml.training.distributed import Launch, check_world, plan_launch, torchrun_command

TESTS = Path(__file__).parent
REPO = TESTS.parent
CPU = DeviceInfo("cpu")
GPUS = DeviceInfo("cuda", gpu_count=4, bf16_supported=True, gpu_memory_bytes=80 * 2**30)


def _settings(**fields):
    from lora_pipeline.config.distributed import DistributedSettings

    return DistributedSettings(**fields)


def test_the_launch_resolves_auto_and_refuses_what_would_fall_back_silently():
    assert plan_launch(_settings(), CPU) == Launch("none", 1, 1)
    assert plan_launch(_settings(), GPUS) == Launch("ddp", 4, 1)
    assert plan_launch(_settings(nproc_per_node=2), CPU) == Launch("ddp", 2, 1)
    assert plan_launch(_settings(nproc_per_node="2", nnodes=2), CPU).world_size == 4
    assert plan_launch(_settings(strategy="fsdp", nproc_per_node=2), GPUS).strategy == "fsdp"
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        plan_launch(_settings(strategy="fsdp", nproc_per_node=2), CPU)
    with pytest.raises(ConfigError, match="'none' trains in one process"):
        plan_launch(_settings(strategy="none", nproc_per_node=2), CPU)
    with pytest.raises(ConfigError, match="has 4 GPU"):
        plan_launch(_settings(nproc_per_node=8), GPUS)
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        _settings(nproc_per_node="two")


def test_torchrun_needs_a_rendezvous_endpoint_for_several_nodes():
    one = torchrun_command(Launch("ddp", 2), "m", ["spec"], environ={})
    assert one[-3:] == ["-m", "m", "spec"] and "--standalone" in one and one[one.index("--nproc-per-node") + 1] == "2"
    with pytest.raises(ConfigError, match="PET_RDZV_ENDPOINT"):
        torchrun_command(Launch("ddp", 1, 2), "m", [], environ={})
    two = torchrun_command(Launch("ddp", 1, 2), "m", [], environ={"PET_RDZV_ENDPOINT": "10.0.0.1:29400"})
    assert two[two.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and "--standalone" not in two


def test_a_trainer_that_runs_another_world_than_asked_is_refused():
    from types import SimpleNamespace

    def trainer(world_size, kind):
        return SimpleNamespace(args=SimpleNamespace(world_size=world_size),
                               accelerator=SimpleNamespace(state=SimpleNamespace(distributed_type=kind)))

    assert check_world(trainer(2, "MULTI_CPU"), Launch("ddp", 2)) == {"world_size": 2, "distributed_type": "MULTI_CPU"}
    with pytest.raises(RuntimeError, match="each rank would train alone"):
        check_world(trainer(1, "NO"), Launch("ddp", 2))
    with pytest.raises(RuntimeError, match="asked for fsdp, but the Trainer runs MULTI_GPU"):
        check_world(trainer(2, "MULTI_GPU"), Launch("fsdp", 2))


def test_fsdp_shards_the_memory_plan_and_is_suggested_when_one_gpu_is_too_small(micro_base):
    from lora_pipeline.config.schema import LoraSettings, QuantizationSettings, TrainingSettings
    from lora_pipeline.ml.base.memory import knobs, plan_memory

    architecture = {**json.loads((micro_base / "config.json").read_text()),  # TinyLlama 1.1B's shapes
                    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}
    lora, quantization = LoraSettings(r=8), QuantizationSettings(mode="none")
    one = plan_memory(architecture, lora, quantization, TrainingSettings(distributed=_settings(nproc_per_node=1)), GPUS)
    ddp = plan_memory(architecture, lora, quantization, TrainingSettings(distributed=_settings(nproc_per_node=2)), GPUS)
    fsdp = plan_memory(architecture, lora, quantization,
                       TrainingSettings(distributed=_settings(strategy="fsdp", nproc_per_node=4)), GPUS)
    assert ddp.base_weights == one.base_weights and ddp.gradients == 2 * one.gradients  # DDP's buckets
    assert fsdp.optimizer_states == pytest.approx(ddp.optimizer_states / 4, rel=0.01)
    assert fsdp.base_weights < ddp.base_weights and "sharded over 4 ranks" in fsdp.notes["base_weights"]
    suggested = [knob for knob in knobs(one, one.total - one.base_weights // 3)
                 if any(key == "training.distributed.nproc_per_node" for key, _, _ in knob.changes)]
    assert suggested and 'training.distributed.strategy="fsdp"' in suggested[0].overrides


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _what_failed(output: str) -> str:
    """A failed launch's interleaved output, readable: every rank's error lines first (the rank that crashed is
    rarely the one whose traceback ends the output), then the tail."""
    errors = [line for line in output.splitlines() if "Error" in line or "Traceback" in line or "Killed" in line]
    return "\n".join(errors[:60]) + "\n--- tail ---\n" + output[-3000:]


def _ranks(base: Path, train_file: Path, out: Path, batch: int, nproc: int, nnodes: int = 1, node_commands=None):
    """Run tests/distributed_rank.py: in this process's interpreter without torchrun for one process, else under
    torchrun (or the given per-node commands); each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    args = [str(base), str(train_file), str(out), str(batch), str(nproc), str(nnodes)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc * nnodes == 1:
        commands = [[sys.executable, str(TESTS / "distributed_rank.py"), *args]]
    else:
        commands = node_commands or [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc-per-node", str(nproc), str(TESTS / "distributed_rank.py"), *args]]
        commands = [command + args if command[-1].endswith(".py") else command for command in commands]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, _what_failed(output)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(nproc * nnodes)]


@pytest.fixture(scope="module")
def micro_split(micro_base, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from conftest import dataset_settings, format_rows

    formatted = format_rows(AutoTokenizer.from_pretrained(micro_base), dataset_settings(max_rows=80),
                            eval_fraction=0.15, max_length=96)
    path = tmp_path_factory.mktemp("split") / "train.parquet"
    formatted.train.to_pandas().to_parquet(path)
    return path


def _losses(result: dict) -> list[float]:
    return [loss for _, loss in result["loss_history"]]


@pytest.mark.slow
def test_two_ranks_with_batch_one_train_as_one_process_with_batch_two(micro_base, micro_split, tmp_path):
    from safetensors.torch import load_file

    [alone] = _ranks(micro_base, micro_split, tmp_path / "one", batch=2, nproc=1)
    ranks = _ranks(micro_base, micro_split, tmp_path / "two", batch=1, nproc=2)
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["distributed_type"] == "MULTI_CPU"
    assert alone["world_size"] == 1 and len(_losses(alone)) == 4
    for rank in ranks:  # the logged loss is every rank's tokens' mean, on each rank
        assert max(abs(a - b) for a, b in zip(_losses(alone), _losses(rank))) < 1e-5
    assert ranks[0]["train_tokens"] == alone["train_tokens"]
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


@pytest.mark.slow
def test_qlora_nf4_on_two_ranks_matches_one_process(micro_base, micro_split, tmp_path):
    from lora_pipeline.ml.base.quantize import quantize_base

    base = tmp_path / "nf4"
    quantize_base(micro_base, base, "nf4", True, "float32", CPU)
    [alone] = _ranks(base, micro_split, tmp_path / "one", batch=2, nproc=1)
    ranks = _ranks(base, micro_split, tmp_path / "two", batch=1, nproc=2)
    assert ranks[0]["world_size"] == 2
    assert max(abs(a - b) for a, b in zip(_losses(alone), _losses(ranks[0]))) < 2e-3


@pytest.mark.slow
def test_two_torchrun_agents_rendezvous_on_loopback_as_two_nodes(micro_base, micro_split, tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "loopback",
               "--max-restarts", "0", str(TESTS / "distributed_rank.py")] for _ in range(2)]
    ranks = _ranks(micro_base, micro_split, tmp_path / "nodes", batch=1, nproc=1, nnodes=2, node_commands=agents)
    assert [r["world_size"] for r in ranks] == [2, 2]
    [alone] = _ranks(micro_base, micro_split, tmp_path / "one", batch=2, nproc=1)
    assert max(abs(a - b) for a, b in zip(_losses(alone), _losses(ranks[0]))) < 1e-5


def _materialize_training(write_config, fake_resources, **training):
    from lora_pipeline.assets import PIPELINE_ASSETS

    write_config("micro", quantization={"mode": "none"},
                 training={"distributed": {"nproc_per_node": 2}, "max_steps": 4, "checkpoint_every": 2, **training})
    wanted = ("raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["micro"])
    result = dg.materialize([a for a in PIPELINE_ASSETS if a.key.path[-1] in wanted], partition_key="micro",
                            instance=instance, resources=fake_resources, raise_on_error=False)
    return result, instance


@pytest.mark.slow
def test_trained_adapter_launches_torchrun_through_pipes_and_materializes_once(write_config, fake_resources):
    result, instance = _materialize_training(write_config, fake_resources)
    assert result.success
    [materialization] = result.asset_materializations_for_node("trained_adapter")
    assert materialization.metadata["world_size"].value == 2
    assert materialization.metadata["distributed_type"].value == "MULTI_CPU"
    logs = [event.message for event in instance.all_logs(result.run_id) if event.step_key == "trained_adapter"]
    assert any("rank 0 of 2: training (ddp)" in line for line in logs)  # rank 0's Pipes log, in the run log
    assert any(line.startswith("step 4/4 loss") for line in logs)
    assert any("checkpoint at step 2:" in line for line in logs)  # handed over by rank 0, published by the step
    folder = Path(materialization.metadata["uri"].value)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "loss_curve.png").is_file()


@pytest.mark.slow
def test_a_failing_rank_fails_the_step_with_its_error(write_config, fake_resources, monkeypatch):
    monkeypatch.setattr("lora_pipeline.torchrun.launch.WORKER_MODULE", "failing_rank_worker")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO)]))
    result, _ = _materialize_training(write_config, fake_resources)
    assert not result.success
    [failure] = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    error, messages = failure.event_specific_data.error, []
    while error is not None:  # Dagster wraps the step's exception; the rank's error is the cause
        messages.append(error.message)
        error = error.cause
    assert any(m.startswith("lora_pipeline.torchrun.launch.DistributedTrainingError: rank 1 of 2 failed: "
                            "ValueError: rank 1 was told to fail") for m in messages), messages


def _worker_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in command:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_cancelling_a_cli_run_stops_every_rank(tmp_path, write_config):
    config = write_config("micro", quantization={"mode": "none"},
                          training={"max_steps": 2000, "checkpoint_every": 0, "distributed": {"nproc_per_node": 2}})
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "LORA_PIPELINE_STORAGE": str(tmp_path / "store")}
    run = subprocess.Popen([sys.executable, "-m", "lora_pipeline.cli", "run", str(config), "--select",
                            "+trained_adapter"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    marker = "lora_pipeline.torchrun.worker"
    deadline = time.monotonic() + 240
    while len(_worker_processes(marker)) < 3 and time.monotonic() < deadline:  # torchrun and its two ranks
        assert run.poll() is None, run.stderr.read()[-3000:]
        time.sleep(0.5)
    started = _worker_processes(marker)
    assert len(started) >= 3
    time.sleep(8)  # into training
    run.send_signal(signal.SIGINT)  # what Ctrl-C (or Dagster's run termination) does
    run.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while _worker_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _worker_processes(marker), "ranks left running after the run was cancelled"
    assert run.returncode != 0


def test_only_what_changes_the_output_changes_a_stages_version():
    from lora_pipeline.assets.stages import pipeline
    from lora_pipeline.config.registry import load_config_file

    def versions(*overrides):
        config = load_config_file(REPO / "configs" / "tiny-demo.yaml", list(overrides))
        return {name: json.dumps(stage.reads.of(config), sort_keys=True) for name, stage in pipeline().items()}

    default = versions()
    # The new keys at their defaults hash as before they existed (no model is redone by the upgrade).
    assert "distributed" not in default["trained_adapter"] and "quant_storage" not in default["quantized_base"]
    assert versions("quantization.quant_storage=uint8") == default
    more = versions("training.distributed.nproc_per_node=2")  # a larger effective batch: a new adapter
    assert more["quantized_base"] == default["quantized_base"] and more["trained_adapter"] != default["trained_adapter"]
    fsdp = versions("training.distributed.strategy=fsdp")  # 4-bit weights stored in the compute dtype
    assert fsdp["quantized_base"] != default["quantized_base"] and '"quant_storage": "compute_dtype"' in fsdp["quantized_base"]
