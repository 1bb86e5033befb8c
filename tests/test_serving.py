"""vLLM serving: which adapters vLLM can load as adapters, the rank it must be started with, and the
files shipped with the champion (a script bash accepts, the JSON form of the adapters, the explanation),
on a base vLLM can load: for a QLoRA adapter, the quantized one it was trained against."""

import argparse
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_pipeline.ml.serving import (
    MeasuredDrift,
    ServedAdapter,
    ServedBase,
    lora_module_argument,
    max_lora_rank_for,
    read_servability,
    servability,
    served_base,
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


# --- what vLLM's `vllm serve` does with the script's arguments, re-implemented from its source ---


@dataclass
class _LoRAModulePath:
    """vLLM's LoRAModulePath (vllm/entrypoints/openai/models/protocol.py): a missing name or path, or any other
    key, is a TypeError."""

    name: str
    path: str
    base_model_name: str | None = None


class _LoRAParserAction(argparse.Action):
    """vLLM's LoRAParserAction (vllm/entrypoints/openai/cli_args.py), rule for rule: a value with '=' and no ','
    is NAME=PATH split at every '=' (more than one '=' raises ValueError, uncaught there too), anything else one
    JSON object; each occurrence of the flag replaces the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values:
            if item in (None, ""):
                continue
            if "=" in item and "," not in item:
                name, path = item.split("=")
                modules.append(_LoRAModulePath(name, path))
            else:
                try:
                    modules.append(_LoRAModulePath(**json.loads(item)))
                except json.JSONDecodeError:
                    parser.error(f"Invalid JSON format for --lora-modules: {item}")
                except TypeError as error:
                    parser.error(f"Invalid fields for --lora-modules: {item} - {error}")
        setattr(namespace, self.dest, modules)


def _vllm_serve_parser() -> argparse.ArgumentParser:
    """The `vllm serve` options the serving files use, typed as vLLM's get_kwargs types them (lists: nargs '+')."""
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("model")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--revision")
    parser.add_argument("--quantization")
    parser.add_argument("--enable-lora", action=argparse.BooleanOptionalAction)
    parser.add_argument("--lora-modules", nargs="+", action=_LoRAParserAction)
    parser.add_argument("--max-lora-rank", type=int)
    parser.add_argument("--max-loras", type=int)
    parser.add_argument("--chat-template")
    return parser


def _serve_words(script: str) -> list[str]:
    """The words after `vllm serve` on the script's exec line, split as bash splits them (without "$@")."""
    joined = script.replace("\\\n", "")  # bash drops a backslash-newline before splitting words
    line = next(line for line in joined.splitlines() if line.startswith("exec vllm serve "))
    words = shlex.split(line)
    assert words[:3] == ["exec", "vllm", "serve"] and words[-1] == "$@"
    return words[3:-1]


def _vllm_reads(script: str) -> argparse.Namespace:
    """The script's exec line as vLLM's argument parser reads it."""
    return _vllm_serve_parser().parse_args(_serve_words(script))


AWKWARD_PATHS = {"plain": "/store/trained_adapter/abc", "spaced": "/store/le gal",
                 "equals": "/store/run=3/adapter", "comma": "/store/a,b", "remote": "s3://bucket/key=v/adapter"}


def test_every_lora_modules_value_is_one_vllm_parses_back_to_its_name_and_path():
    adapters = [ServedAdapter(name, path, 8) for name, path in AWKWARD_PATHS.items()]
    script = serving_files("meta-llama/Llama-3.1-8B", adapters)["serve-vllm.sh"]
    words = _serve_words(script)
    assert words.count("--lora-modules") == 1  # a second one would replace the first's list
    parsed = _vllm_reads(script)
    assert [(module.name, module.path) for module in parsed.lora_modules] == list(AWKWARD_PATHS.items())
    assert parsed.model == "meta-llama/Llama-3.1-8B" and parsed.enable_lora and parsed.max_loras == 5
    by_name = {module.name: module for module in parsed.lora_modules}
    # A path with '=' or ',' only survives as the JSON object, which names the base as vLLM serves it.
    assert by_name["equals"].base_model_name == by_name["comma"].base_model_name == "meta-llama/Llama-3.1-8B"
    assert "plain=/store/trained_adapter/abc" in words  # the short form where vLLM reads it back unchanged


def test_the_name_equals_path_form_alone_would_break_on_such_paths():
    parser = _vllm_serve_parser()
    with pytest.raises(ValueError, match="too many values"):
        parser.parse_args(["base", "--lora-modules", "equals=/store/run=3/adapter"])
    with pytest.raises(SystemExit):
        parser.parse_args(["base", "--lora-modules", "comma=/store/a,b"])
    for name, path in AWKWARD_PATHS.items():
        module, = parser.parse_args(
            ["base", "--lora-modules", lora_module_argument(ServedAdapter(name, path, 8), "base")]).lora_modules
        assert (module.name, module.path) == (name, path)


def test_lora_modules_json_holds_one_vllm_value_per_adapter_not_a_value_itself():
    files = serving_files("meta-llama/Llama-3.1-8B", [ServedAdapter("a", "/s/a", 8), ServedAdapter("b", "/s,b", 16)])
    listed = json.loads(files["lora-modules.json"])
    parser = _vllm_serve_parser()
    with pytest.raises(SystemExit):  # the list as one value: vLLM refuses it
        parser.parse_args(["meta-llama/Llama-3.1-8B", "--lora-modules", files["lora-modules.json"]])
    parsed = parser.parse_args(["meta-llama/Llama-3.1-8B", "--lora-modules", *[json.dumps(item) for item in listed]])
    assert [(module.name, module.path, module.base_model_name) for module in parsed.lora_modules] == [
        ("a", "/s/a", "meta-llama/Llama-3.1-8B"), ("b", "/s,b", "meta-llama/Llama-3.1-8B")]
    assert "jq -c '.[]' lora-modules.json" in files["SERVING.md"] and "does not accept the list" in files["SERVING.md"]


@pytest.mark.parametrize("base", [ServedBase("base"), served_base(
    "builtin:tiny-llama", "/store/quantized_base/q1", {"quantization": "nf4", "double_quant": True,
                                                        "quant_storage": "uint8"})])
def test_bash_passes_vllm_the_words_shlex_reads(base, tmp_path):
    adapters = [ServedAdapter(name, path, 8) for name, path in AWKWARD_PATHS.items()]
    script = tmp_path / "serve-vllm.sh"
    script.write_text(serving_files(base, adapters)["serve-vllm.sh"], encoding="utf-8")
    received = _words_vllm_gets(script, tmp_path, "--port", "8080")
    assert received == ["serve", *_serve_words(script.read_text()), "--port", "8080"]


def _words_vllm_gets(script, tmp_path, *arguments: str, cwd=None) -> list[str]:
    """Run the script with a stand-in vllm on PATH that writes the arguments it got, one per NUL-ended record."""
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$ARGS_OUT"\n', encoding="utf-8")
    fake.chmod(0o755)
    out = tmp_path / "args"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGS_OUT": str(out)}
    subprocess.run(["bash", str(script), *arguments], check=True, env=env, cwd=cwd)
    return [word.decode() for word in out.read_bytes().split(b"\0")[:-1]]


def test_a_builtin_base_is_served_from_its_stored_folder_under_its_own_name(tmp_path):
    adapters = [ServedAdapter("demo", "/store/trained_adapter/a1", 8)]
    with pytest.raises(ValueError, match="builtin:tiny-llama"):
        serving_files("builtin:tiny-llama", adapters)
    base = served_base("builtin:tiny-llama", "/store/quantized_base/b1", {"quantization": "none"})
    assert base == ServedBase("builtin:tiny-llama", "/store/quantized_base/b1")
    files = serving_files(base, adapters)
    parsed = _vllm_reads(files["serve-vllm.sh"])
    assert parsed.model == "/store/quantized_base/b1" and parsed.served_model_name == ["builtin:tiny-llama"]
    assert parsed.quantization is None and "vllm serve builtin:" not in files["serve-vllm.sh"]
    # base_model_name is honoured by vLLM only when it is a served name of the base (OpenAIServingModels.is_base_model).
    assert {item["base_model_name"] for item in json.loads(files["lora-modules.json"])} == {"builtin:tiny-llama"}
    assert "`/store/quantized_base/b1`" in files["SERVING.md"]
    _bash_accepts(files["serve-vllm.sh"], tmp_path)


NF4 = {"base_model": "meta-llama/Llama-3.1-8B", "revision": "r1", "source_dtype": "bfloat16",
       "quantization": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "quant_storage": "uint8"}
# An eval_report comparison as metrics_document() writes it, with the merge into the original weights compared.
COMPARISON = {"comparison": {"examples": 204, "merged_vs_adapter_loss_change": 0.0004, "merge_weights": "dequantized",
                             "merged_into_original_vs_adapter_loss_change": 0.0873}}


def test_a_qlora_adapter_is_served_on_the_quantized_base_it_was_trained_against(tmp_path):
    base = served_base("meta-llama/Llama-3.1-8B", "/store/quantized_base/q1", NF4)
    assert base.prequantized and base.loading == "prequantized"
    files = serving_files(base, [ServedAdapter("support", "/store/trained_adapter/a1", 16)],
                          drift=MeasuredDrift.from_metrics(COMPARISON))
    parsed = _vllm_reads(files["serve-vllm.sh"])
    assert parsed.model == "/store/quantized_base/q1" and parsed.quantization == "bitsandbytes"
    assert parsed.served_model_name == ["meta-llama/Llama-3.1-8B"] and parsed.revision is None
    doc = files["SERVING.md"]
    assert "NF4 4-bit, double-quantized constants" in doc and "the very weights they were trained against" in doc
    # The drift quoted is eval_report's, passed in, not a figure of the module's own.
    assert "+8.73% held-out loss" in doc and "204 held-out examples" in doc and "--pipeline-parallel-size" in doc
    other = serving_files(base, [ServedAdapter("support", "/s/a", 16)], drift=MeasuredDrift(50, unquantized_base=0.031))
    assert "+3.1% held-out loss" in other["SERVING.md"] and "on 50 held-out examples" in other["SERVING.md"]
    _bash_accepts(files["serve-vllm.sh"], tmp_path)


def test_the_stored_quantized_base_is_a_checkpoint_vllm_loads_as_prequantized(micro_base, tmp_path):
    from safetensors import safe_open

    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.base.quantize import quantize_base

    quantize_base(micro_base, tmp_path, "nf4", True, "float32", DeviceInfo(device="cpu"))
    # What vLLM's BitsAndBytesModelLoader checks (model_loader/bitsandbytes_loader.py): quant_method in
    # config.json makes it pre-quantized, and each weight's quant state sits under
    # '<weight>.quant_state.bitsandbytes__nf4'; its BitsAndBytesConfig accepts only uint8 storage.
    settings = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "bitsandbytes" and settings["bnb_4bit_quant_storage"] == "uint8"
    assert settings["bnb_4bit_quant_type"] == "nf4" and settings["bnb_4bit_use_double_quant"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in names
    base = served_base("builtin:micro-llama", str(tmp_path), {"quantization": "nf4", "double_quant": True,
                                                               "quant_storage": settings["bnb_4bit_quant_storage"]})
    assert base.location == str(tmp_path) and base.loading == "prequantized"


def test_without_a_loadable_quantized_folder_vllm_quantizes_the_same_nf4_at_load_time():
    fsdp = {**NF4, "quant_storage": "bfloat16"}  # packed as FSDP needs them, which vLLM refuses
    base = served_base("meta-llama/Llama-3.1-8B", "/store/quantized_base/q1", fsdp)
    assert base.loading == "in-flight" and base.location == "meta-llama/Llama-3.1-8B"
    files = serving_files(base, [ServedAdapter("a", "/s/a", 8)], drift=MeasuredDrift.from_metrics(COMPARISON))
    parsed = _vllm_reads(files["serve-vllm.sh"])
    assert parsed.model == "meta-llama/Llama-3.1-8B" and parsed.revision == "r1"
    assert parsed.quantization == "bitsandbytes" and parsed.served_model_name is None
    doc = files["SERVING.md"]
    assert "NF4 in blocks of 64 with double-quantized constants" in doc and "the same 4-bit weights" in doc
    cast = serving_files(served_base("meta-llama/Llama-3.1-8B", "/q", {**fsdp, "source_dtype": "float32"}),
                         [ServedAdapter("a", "/s/a", 8)])["SERVING.md"]
    assert "may round differently" in cast and "the same 4-bit weights" not in cast
    builtin = served_base("builtin:tiny-llama", "/store/quantized_base/q1", fsdp, "/store/quantized_base/q1/original")
    assert builtin.location == "/store/quantized_base/q1/original" and builtin.loading == "in-flight"
    with pytest.raises(ValueError, match="no unquantized copy"):
        served_base("builtin:tiny-llama", "/store/quantized_base/q1", fsdp)


@pytest.mark.parametrize("trained", [{"quantization": "fp4"}, {"quantization": "nf4", "double_quant": False}])
def test_a_quantization_vllm_cannot_reproduce_is_said_with_the_measured_drift(trained):
    base = served_base("meta-llama/Llama-3.1-8B", "/q", {**NF4, "quant_storage": "bfloat16", **trained})
    assert base.loading == "unquantized"
    files = serving_files(base, [ServedAdapter("a", "/s/a", 8)], drift=MeasuredDrift.from_metrics(COMPARISON))
    assert _vllm_reads(files["serve-vllm.sh"]).quantization is None  # vLLM's in-flight NF4 would be another model
    doc = files["SERVING.md"]
    assert "not served on the base they were trained against" in doc and "+8.73% held-out loss" in doc
    assert "merged into dequantized weights; eval_report measured +0.04%" in doc
    assert "WARNING" in files["serve-vllm.sh"]


def test_a_drift_that_was_not_measured_is_said_not_invented():
    base = served_base("meta-llama/Llama-3.1-8B", "/q", NF4)
    for drift in (None, MeasuredDrift.from_metrics({"comparison": {"examples": 10, "merge_weights": "dequantized",
                                                                   "merged_vs_adapter_loss_change": 0.001}})):
        doc = serving_files(base, [ServedAdapter("a", "/s/a", 8)], drift=drift)["SERVING.md"]
        assert "did not measure" in doc and "%" not in doc


def test_measured_drift_reads_eval_reports_comparison():
    assert MeasuredDrift.from_metrics(COMPARISON) == MeasuredDrift(204, 0.0873, 0.0004, "dequantized")
    # Merged into the original weights, the merged model is itself the adapter on the unquantized base.
    original = {"examples": 8, "merged_vs_adapter_loss_change": 0.05, "merge_weights": "original"}
    assert MeasuredDrift.from_metrics(original) == MeasuredDrift(8, 0.05, 0.05, "original")


def test_a_plain_lora_base_is_served_as_it_is(tmp_path):
    hub = served_base("meta-llama/Llama-3.1-8B", "/store/quantized_base/q0", {"quantization": "none", "revision": "r1"})
    assert hub == ServedBase("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B", revision="r1")
    files = serving_files(hub, [ServedAdapter("a", "/s/a", 8)])
    parsed = _vllm_reads(files["serve-vllm.sh"])
    assert (parsed.model, parsed.revision, parsed.quantization, parsed.served_model_name) == (
        "meta-llama/Llama-3.1-8B", "r1", None, None)
    assert served_base("/models/llama", "/q", {"quantization": "none"}).location == "/models/llama"
    _bash_accepts(files["serve-vllm.sh"], tmp_path)


def test_a_merged_only_champion_quotes_its_measured_merge_drift():
    doc = serving_files("builtin:tiny-llama", [], {"demo": "/store/merged"},
                        drift=MeasuredDrift.from_metrics(COMPARISON))["SERVING.md"]
    assert "`demo` was merged into dequantized weights; eval_report measured it at +0.04% held-out loss" in doc


@pytest.mark.parametrize("merged", [False, True])
def test_the_training_template_ships_beside_the_script_and_every_server_is_given_it(tmp_path, merged):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    adapters = [] if merged else [ServedAdapter("a", "/s/a", 8)]
    files = serving_files("meta-llama/Llama-3.1-8B", adapters, {"m": "/s/m"} if merged else None,
                          chat_template=template)
    assert files["chat_template.jinja"] == template and "--chat-template" in files["SERVING.md"]
    folder = tmp_path / "serving dir"  # a space: the path must reach vLLM as one word, wherever it is run from
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    received = _words_vllm_gets(folder / "serve-vllm.sh", tmp_path, cwd=tmp_path)
    given = received[received.index("--chat-template") + 1]
    assert given == str(folder / "chat_template.jinja") and Path(given).read_text() == template
    assert "--chat-template" not in serving_files("meta-llama/Llama-3.1-8B", adapters,
                                                  {"m": "/s/m"} if merged else None)["serve-vllm.sh"]
