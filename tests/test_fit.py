"""The memory plan as a gate: a training that will not fit the device is refused before loading, with the knobs."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_pipeline.assets import formatted_dataset, quantized_base, raw_dataset, trained_adapter
from lora_pipeline.assets.common import MODEL_PARTITIONS


def test_training_that_will_not_fit_the_gpu_is_refused_before_loading_and_names_what_fits(
        write_config, fake_resources, monkeypatch):
    import lora_pipeline.assets.training as training
    from lora_pipeline.resources import FixedCompute

    write_config("micro", training={"max_length": 2048, "batch_size": 64})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro"])
    upstream = [raw_dataset, formatted_dataset, quantized_base]
    assert dg.materialize(upstream, partition_key="micro", instance=instance, resources=fake_resources).success

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the plan said it does not fit")

    monkeypatch.setattr(training, "train_adapter", must_not_load)
    small_gpu = {**fake_resources, "compute": FixedCompute(device="cuda", gpu_count=1, bf16_supported=True,
                                                          gpu_memory_gb=0.25)}
    result = dg.materialize([*upstream, trained_adapter], selection=["trained_adapter"], partition_key="micro",
                            instance=instance, resources=small_gpu, raise_on_error=False)
    assert not result.success
    error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").event_specific_data.error.cause
    assert error.cls_name == "ModelError"
    assert "needs about" in error.message and "more than the GPU's 0.2 GiB" in error.message
    assert "refused before loading anything" in error.message and "activations" in error.message
    assert "what would fit: training." in error.message and "--set training." in error.message
    with pytest.raises(Exception):
        fake_resources["storage"].current("micro", "trained_adapter")


def test_validate_prints_the_memory_plan_of_the_shipped_8b_config_with_no_network(monkeypatch):
    import json
    import subprocess
    import sys

    from conftest import REPO

    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", "validate", "configs/llama-3.1-8b-qlora.yaml",
                           "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])["memory_plan"]
    assert set(plan["terms"]) >= {"base_weights", "adapter", "gradients", "optimizer_states", "activations"}
    assert 4 * 2**30 < plan["terms"]["base_weights"] < 8 * 2**30  # 8B parameters, NF4 linears


def test_runs_check_before_the_data_is_tokenized_suggests_no_length_it_cannot_know(write_config):
    """Before raw_dataset runs no length that keeps 95% of the examples is known: the pre-check's knobs leave
    max_length alone and point to validate, which tokenizes the data and knows (the issue saw 4096 -> 64)."""
    from lora_pipeline.cli.run import check_before_loading
    from lora_pipeline.config.registry import load_config_file
    from lora_pipeline.errors import ModelError
    from lora_pipeline.resources import FixedCompute

    config = load_config_file(write_config("micro", training={"max_length": 2048, "batch_size": 64}))
    small_gpu = FixedCompute(device="cuda", gpu_count=1, bf16_supported=True, gpu_memory_gb=0.25)
    with pytest.raises(ModelError) as refused:
        check_before_loading(config, ["trained_adapter"], {"compute": small_gpu})
    message = str(refused.value)
    assert "what would fit: training." in message and "training.max_length 2048 ->" not in message
    assert "`lora-pipeline validate CONFIG` names the lengths that keep 95% and 99% of the examples whole" in message
