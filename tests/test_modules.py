"""'auto' resolved: target modules per architecture, precision and placement per device."""

import pytest

from lora_pipeline.ml.base.modules import resolve_target_modules


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("mistral", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("gemma2", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("gpt2", ["c_attn", "c_proj", "c_fc"]),
        ("falcon", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ],
)
def test_auto_selects_every_linear_projection(model_type, expected):
    assert resolve_target_modules(["auto"], model_type) == expected


def test_explicit_names_pass_through_and_unknown_architectures_use_peft_all_linear():
    assert resolve_target_modules(["q_proj"], "llama") == ["q_proj"]
    assert resolve_target_modules(["auto"], "some_new_arch") == "all-linear"


@pytest.mark.parametrize(
    ("reported", "settings", "expected"),
    [
        ({"device": "cuda", "gpu_count": 2, "bf16_supported": True, "gpu_memory_gb": 80},
         {}, {"compute_dtype": "bfloat16", "precision": "bf16", "gradient_checkpointing": True, "device_map": {"": 0}}),
        ({"device": "cuda", "gpu_count": 1, "bf16_supported": False, "gpu_memory_gb": 16},
         {}, {"compute_dtype": "float16", "precision": "fp16", "gradient_checkpointing": True, "device_map": {"": 0}}),
        ({"device": "cuda", "gpu_count": 1, "bf16_supported": True, "gpu_memory_gb": 24},
         {"quantization": {"compute_dtype": "float32"}, "training": {"precision": "fp32", "gradient_checkpointing": "off"}},
         {"compute_dtype": "float32", "precision": "fp32", "gradient_checkpointing": False}),
        ({"device": "cpu"}, {},
         {"compute_dtype": "float32", "precision": "fp32", "gradient_checkpointing": False, "device_map": {"": "cpu"}}),
    ],
)
def test_the_compute_resource_picks_precision_and_placement_for_the_device(reported, settings, expected):
    """'auto' follows the device (a fake one reporting a GPU of a given size); explicit settings win."""
    from conftest import micro_config_data

    from lora_pipeline.config.registry import validate_config
    from lora_pipeline.resources import FixedCompute

    compute = FixedCompute(**reported)
    choices = compute.choices(validate_config(micro_config_data(**settings), "test"))
    assert {key: choices[key] for key in expected} == expected
    assert choices["gpu_count"] == reported.get("gpu_count", 0)
    assert choices["gpu_memory_gib"] == reported.get("gpu_memory_gb", 0.0)
