"""vLLM serving: which adapters vLLM can load as adapters, the rank it must be started with, and the
files shipped with the champion (a script bash accepts, the JSON form of the adapters, the explanation)."""

import json
import subprocess

import pytest

from lora_pipeline.ml.serving import (
    ServedAdapter,
    max_lora_rank_for,
    read_servability,
    servability,
    serving_files,
)

SERVABLE = {"r": 16, "lora_alpha": 32, "modules_to_save": None, "use_dora": False, "bias": "none",
            "rank_pattern": {}, "target_modules": ["q_proj", "v_proj"]}


def _bash_accepts(script: str, tmp_path) -> None:
    path = tmp_path / "serve-vllm.sh"
    path.write_text(script, encoding="utf-8")
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_a_plain_lora_adapter_is_servable():
    result = servability(SERVABLE)
    assert result.servable and result.mode == "adapter" and result.rank == 16 and result.reasons == ()
    assert result.as_dict() == {"servable": True, "mode": "adapter", "rank": 16, "reasons": []}


def test_modules_to_save_is_merged_only_and_says_which():
    result = servability({**SERVABLE, "modules_to_save": ["lm_head"]})
    assert result.mode == "merged-only" and len(result.reasons) == 1
    assert "lm_head" in result.reasons[0] and "merged" in result.reasons[0]


@pytest.mark.parametrize("change, named", [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias 'all'"),
                                           ({"bias": "lora_only"}, "lora_only"), ({"r": 1024}, "rank 1024")])
def test_what_vllm_refuses_is_merged_only(change, named):
    result = servability({**SERVABLE, **change})
    assert result.mode == "merged-only" and named in result.reasons[0]


def test_every_problem_gets_its_own_reason():
    result = servability({**SERVABLE, "modules_to_save": ["lm_head"], "use_dora": True, "bias": "all"})
    assert len(result.reasons) == 3


def test_rank_pattern_raises_the_rank():
    assert servability({**SERVABLE, "rank_pattern": {"q_proj": 96}}).rank == 96
    assert servability({**SERVABLE, "rank_pattern": {"q_proj": 4}}).rank == 16
    assert servability({**SERVABLE, "rank_pattern": {"q_proj": 600}}).mode == "merged-only"


def test_a_config_saved_by_peft_is_read(tmp_path):
    from peft import LoraConfig

    LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]).save_pretrained(tmp_path)
    result = read_servability(tmp_path)
    assert result.mode == "merged-only" and result.rank == 8 and "lm_head" in result.reasons[0]
    LoraConfig(r=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    assert read_servability(tmp_path).mode == "adapter"


def test_max_lora_rank_is_the_smallest_allowed_that_fits():
    assert max_lora_rank_for([4, 16]) == 16
    assert max_lora_rank_for([20]) == 32
    assert max_lora_rank_for([300]) == 320
    with pytest.raises(ValueError, match="600"):
        max_lora_rank_for([600])


def test_two_adapters_share_one_server(tmp_path):
    files = serving_files("meta-llama/Llama-3.1-8B",
                          [ServedAdapter("support", "/store/support", 8), ServedAdapter("legal", "/store/le gal", 32)])
    script = files["serve-vllm.sh"]
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert "vllm serve meta-llama/Llama-3.1-8B" in script and "--enable-lora" in script
    assert "support=/store/support" in script and "'legal=/store/le gal'" in script  # quoted: the path has a space
    assert "--max-lora-rank 32" in script and "--max-loras 2" in script
    _bash_accepts(script, tmp_path)
    assert json.loads(files["lora-modules.json"]) == [
        {"name": "support", "path": "/store/support", "base_model_name": "meta-llama/Llama-3.1-8B"},
        {"name": "legal", "path": "/store/le gal", "base_model_name": "meta-llama/Llama-3.1-8B"}]
    assert '"model": "support"' in files["SERVING.md"]


def test_merged_only_serves_the_merged_model(tmp_path):
    files = serving_files("base/model", [], {"demo": "/store/merged"})
    script = files["serve-vllm.sh"]
    assert "--enable-lora" not in script and "vllm serve /store/merged --served-model-name demo" in script
    assert "merged-only" in script
    _bash_accepts(script, tmp_path)
    assert json.loads(files["lora-modules.json"]) == []
    assert "merged-only" in files["SERVING.md"].lower() and '"model": "demo"' in files["SERVING.md"]


def test_several_merged_models_get_a_port_each(tmp_path):
    script = serving_files("base", [], {"a": "/m/a", "b": "/m/b"})["serve-vllm.sh"]
    assert "--port 8000" in script and "--port 8001" in script
    _bash_accepts(script, tmp_path)


def test_merged_models_beside_adapters_are_left_for_their_own_server(tmp_path):
    files = serving_files("base", [ServedAdapter("a", "/s/a", 8)], {"b": "/m/b"})
    script = files["serve-vllm.sh"]
    assert "--enable-lora" in script and "# vllm serve /m/b" in script
    _bash_accepts(script, tmp_path)
    assert "`b`" in files["SERVING.md"]


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "-flag", "a=b", "naïve"])
def test_invalid_names_are_refused(name):
    with pytest.raises(ValueError, match="letters, digits"):
        serving_files("base", [ServedAdapter(name, "/s/a", 8)])


def test_repeated_names_and_nothing_to_serve_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        serving_files("base", [ServedAdapter("a", "/s/a", 8), ServedAdapter("a", "/s/b", 8)])
    with pytest.raises(ValueError, match="repeat"):
        serving_files("base", [ServedAdapter("a", "/s/a", 8)], {"a": "/m/a"})
    with pytest.raises(ValueError, match="nothing to serve"):
        serving_files("base", [])
