"""'auto' target modules per architecture."""

import pytest

from lora_pipeline.ml.modules import resolve_target_modules


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
