"""GGUF export: the built-in model and an adapter converted by llama.cpp's own scripts, read back and compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.export import gguf as export

# The converter scripts are fetched once (pip download of the pinned sdist) into the user's cache.
CACHE = export.default_cache()


@pytest.fixture(scope="module")
def micro_adapter(micro_base, tmp_path_factory) -> Path:
    """A LoRA adapter on the micro base with non-zero A and B (as if trained), saved the PEFT way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a trained adapter's is not
                parameter.normal_(std=0.02)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize(("gguf_type", "tolerance"), [("f16", 2e-3), ("q8_0", 2e-2)])
def test_the_built_in_model_exports_and_reads_back_as_its_weights(micro_base, tmp_path, gguf_type, tolerance):
    out = export.convert_model(micro_base, tmp_path / f"micro.{gguf_type}.gguf", gguf_type, CACHE)
    config = json.loads((micro_base / "config.json").read_text())
    check = export.compare_with_safetensors(out, micro_base / "model.safetensors", config)
    assert check.compared == check.tensors  # every tensor in the file came from the safetensors, none left out
    assert 0 < check.max_abs_diff < tolerance  # fp16 rounding / q8_0 block error, not zero (it was converted)


def test_the_adapter_exports_and_its_lora_tensors_read_back(micro_base, micro_adapter, tmp_path):
    out = export.convert_adapter(micro_adapter, micro_base, tmp_path / "adapter.gguf", "f16", CACHE)
    config = json.loads((micro_base / "config.json").read_text())
    check = export.compare_with_safetensors(out, micro_adapter / "adapter_model.safetensors", config)
    assert check.compared == check.tensors == 2 * 4 * config["num_hidden_layers"]  # A and B of 4 modules a layer
    assert check.max_abs_diff < 1e-3


def test_modelfiles_name_the_files_and_the_template_in_ollama_syntax():
    merged = export.modelfile("./merged.q8_0.gguf", "chatml", eos="</s>")
    assert merged.splitlines()[0] == "FROM ./merged.q8_0.gguf" and "ADAPTER" not in merged
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in merged
    assert 'PARAMETER stop "<|im_end|>"' in merged and 'PARAMETER stop "</s>"' in merged
    with_adapter = export.modelfile("./base.gguf", "alpaca", adapter_file="./adapter.gguf", eos="</s>")
    assert with_adapter.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    assert "### Instruction:\n{{ .Prompt }}\n\n### Response:\n" in with_adapter
    assert "TEMPLATE" not in export.modelfile("./m.gguf", "plain")  # no chat format: Ollama's raw prompt
    # A tokenizer's own Jinja template has no Ollama spelling here: Ollama reads it from the GGUF.
    assert export.modelfile("./m.gguf", "tokenizer", eos="</s>") == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'


def test_q4_k_m_needs_llama_quantize_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match="export.llama_quantize"):
        export.check_quantize("q4_k_m", None)
    with pytest.raises(ConfigError, match="not an executable"):
        export.check_quantize("q4_k_m", str(tmp_path / "llama-quantize"))
    assert export.check_quantize("q8_0", None) is None


def test_export_gguf_writes_every_file_checked_and_the_modelfiles(micro_base, micro_adapter, tmp_path):
    # The micro base stands in for the merged model too: both are Llama folders with a tokenizer.
    facts = export.export_gguf(micro_base, micro_adapter, lambda: micro_base, tmp_path, "q8_0", CACHE, None, "chatml")
    assert max(facts[f"{label}_max_abs_diff"] for label in ("merged", "base", "adapter")) < 2e-2
    assert (tmp_path / facts["merged_file"]).stat().st_size == facts["merged_bytes"] > 0
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./merged.q8_0.gguf\nTEMPLATE")
    assert (tmp_path / "Modelfile.adapter").read_text().startswith("FROM ./base.q8_0.gguf\nADAPTER ./adapter.gguf\n")


def test_an_adapter_that_trains_whole_modules_exports_only_the_merged_model(micro_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(micro_base),
                   LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(adapter)

    def base_not_needed():  # for a hub base, locating the weights can mean downloading them
        raise AssertionError("the base's weights were asked for, though no base GGUF is written")

    facts = export.export_gguf(micro_base, adapter, base_not_needed, tmp_path / "out", "f16", CACHE, None, "alpaca")
    assert "lm_head in full" in facts["adapter_skipped"] and "adapter_file" not in facts and "base_file" not in facts
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "merged.f16.gguf"]


def test_a_sharded_model_folder_is_compared_shard_by_shard(micro_base, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(micro_base).save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    out = export.convert_model(micro_base, tmp_path / "micro.gguf", "f16", CACHE)
    config = json.loads((micro_base / "config.json").read_text())
    whole = export.compare_with_safetensors(out, micro_base / "model.safetensors", config)
    assert export.compare_with_safetensors(out, sharded, config) == whole


def test_a_tensor_that_differs_is_caught(micro_base, tmp_path):
    from safetensors.torch import load_file, save_file

    out = export.convert_model(micro_base, tmp_path / "micro.gguf", "f16", CACHE)
    weights = load_file(micro_base / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(weights, tmp_path / "changed.safetensors")
    config = json.loads((micro_base / "config.json").read_text())
    assert export.compare_with_safetensors(out, tmp_path / "changed.safetensors", config).max_abs_diff > 0.99


def test_gguf_export_is_an_on_demand_stage():
    from lora_pipeline.assets import ON_DEMAND_ASSETS, PIPELINE_ASSETS

    assert "gguf_export" in [a.key.path[-1] for a in ON_DEMAND_ASSETS]
    assert "gguf_export" not in [a.key.path[-1] for a in PIPELINE_ASSETS]


@pytest.mark.slow
def test_cli_exports_a_trained_model_when_asked(tmp_path, write_config):
    from test_cli import _cli

    path = write_config("micro")  # NF4 base: the base GGUF comes from the unquantized weights kept beside it
    trained = json.loads(_cli(["run", str(path), "--select", "+merged_model", "--json"], tmp_path,
                              check_rc=0).stdout.splitlines()[-1])
    assert "gguf_export" not in trained["assets"]  # not even downstream of what was selected: only when named
    refused = _cli(["run", str(path), "--select", "gguf_export"], tmp_path, check_rc=2)
    assert "export.gguf is not set" in refused.stderr
    done = _cli(["run", str(path), "--select", "gguf_export", "--set", "export.gguf=q8_0", "--json"], tmp_path,
                check_rc=0)
    meta = json.loads(done.stdout.splitlines()[-1])["assets"]["gguf_export"]["metadata"]
    folder = Path(meta["uri"])
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf") == [
        "adapter.gguf", "base.q8_0.gguf", "merged.q8_0.gguf"]
    assert meta["merged_max_abs_diff"] < 2e-2 and meta["base_max_abs_diff"] < 2e-2 and meta["adapter_max_abs_diff"] < 1e-3
    assert meta["template"] == "alpaca"  # the micro data is alpaca rows: 'auto' resolved, as training rendered it
    assert "### Instruction:" in (folder / "Modelfile").read_text()
    assert f"gguf: {meta['uri']}" in done.stderr


def test_built_in_bases_of_the_old_builder_are_neither_reused_nor_mixed_with_new_tokens(tmp_path):
    """The tokenizer change (byte-fallback BPE) bumps BUILTIN_REVISION: a new cache folder, new stage versions."""
    from conftest import micro_config_data, sample_corpus

    from lora_pipeline.assets.stages import pipeline
    from lora_pipeline.config.schema import ModelConfig
    from lora_pipeline.ml.base.tiny import BUILTIN_REVISION
    from lora_pipeline.resources import LocalModelHub

    built = LocalModelHub(cache_dir=str(tmp_path)).resolve("builtin:micro-llama", None, sample_corpus)
    assert built.name.startswith(f"micro-llama-r{BUILTIN_REVISION}-")
    stages = pipeline()
    builtin = ModelConfig(**micro_config_data())
    for stage in ("formatted_dataset", "quantized_base"):
        assert stages[stage].reads.of(builtin)["base_model"] == f"builtin:micro-llama@r{BUILTIN_REVISION}"
    hub = ModelConfig(**micro_config_data(base_model="org/model"))
    assert stages["quantized_base"].reads.of(hub)["base_model"] == "org/model"  # hub models: as written
