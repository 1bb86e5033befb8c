"""GGUF export: the built-in model and an adapter converted by llama.cpp's own scripts, read back and compared,
and the GGUF's tokenizer checked with llama.cpp's own llama-tokenize against the model's HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.errors import ConfigError, ModelError
from lora_pipeline.ml.export import gguf as export
from lora_pipeline.ml.export import tokens
from lora_pipeline.ml.export.llama_cpp import llama_cpp_token_ids

# The converter scripts are fetched once (pip download of the pinned sdist) into the user's cache, and
# llama-tokenize / llama-quantize built there from the same sdist (make install does both).
CACHE = export.default_cache()

# Texts a vocabulary gets wrong if llama.cpp does not replay the BPE merges in their order: words merged
# with their punctuation ("▁largest." is one token of the micro vocabulary, which a left-to-right merge
# spells "▁lar" "ge" "st" "."), digits, characters outside the vocabulary (byte fallback), blank
# lines, and an Alpaca example ending in the EOS token, as the held-out examples do.
BUILT_IN_TEXTS = [
    "Sort the numbers from smallest to largest.",
    "### Instruction:\nSort the numbers from smallest to largest.\n\n### Response:\n3, 8, 12</s>",
    "What is 12 + 30? It is 42.",
    "naïve café, 東京! ½ 😀",
    "Count the letters in the word dragon: 6.\n\n\nDone.",
    "(a) [b] {c} \"quoted\" 'single' 3.14% $5 #tag @me",
]


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


def test_q4_k_m_takes_the_named_llama_quantize_or_the_built_one(tmp_path):
    with pytest.raises(ConfigError, match="unknown type"):
        export.check_quantize("q3_k", None)
    with pytest.raises(ConfigError, match="not an executable"):
        export.check_quantize("q4_k_m", str(tmp_path / "llama-quantize"))
    assert export.check_quantize("q8_0", None) is None
    assert export.check_quantize("q4_k_m", None) is None  # convert_model then uses the one built into the cache


def test_export_gguf_writes_every_file_checked_and_the_modelfiles(micro_base, micro_adapter, tmp_path):
    # The micro base stands in for the merged model too: both are Llama folders with a tokenizer.
    facts = export.export_gguf(micro_base, micro_adapter, lambda: micro_base, tmp_path, "q8_0", CACHE, None, "chatml",
                               texts=BUILT_IN_TEXTS)
    assert max(facts[f"{label}_max_abs_diff"] for label in ("merged", "base", "adapter")) < 2e-2
    assert (facts["tokenizer_texts_checked"], facts["tokenizer_texts_equal"]) == (len(BUILT_IN_TEXTS),) * 2
    assert facts["tokenizer_first_differing_text"] is None
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


def test_a_tensor_the_converter_drops_is_listed_as_not_compared_never_as_compared(micro_base, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    out = export.convert_model(micro_base, tmp_path / "micro.gguf", "f16", CACHE)
    weights = load_file(micro_base / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints have it; llama.cpp not
    save_file(weights, tmp_path / "with_inv_freq.safetensors")
    config = json.loads((micro_base / "config.json").read_text())
    check = export.compare_with_safetensors(out, tmp_path / "with_inv_freq.safetensors", config)
    assert check.compared == check.tensors and check.unmatched == ()
    assert [name for name, _ in check.not_compared] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    facts = check.facts("merged")
    assert facts["merged_tensors_not_compared"] == 1
    assert "inv_freq (dropped by the converter" in facts["merged_not_compared"]


def test_an_architecture_the_pinned_converter_lacks_is_refused_before_converting(micro_base, micro_adapter, tmp_path):
    import shutil

    unknown = tmp_path / "unknown"
    shutil.copytree(micro_base, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ModelError, match="no GGUF export for NoSuchModelForCausalLM: llama.cpp's convert_hf_to_gguf.py "
                                         r"\(from the pinned llama-cpp-python .*\) has no converter"):
        export.export_gguf(unknown, micro_adapter, lambda: unknown, tmp_path / "out", "f16", CACHE, None, "alpaca")
    assert not (tmp_path / "out").exists()  # refused before anything was converted


def test_a_deepseek_adapter_of_kv_b_proj_is_not_converted_saying_why(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["kv_b_proj", "o_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.kv_b_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.self_attn.kv_b_proj.lora_B.weight": torch.zeros(96, 4)},
              tmp_path / "adapter_model.safetensors")
    # llama.cpp's DeepSeek converter splits kv_b_proj per head, which its LoRA tensors cannot do (NotImplementedError).
    why = export.adapter_not_convertible(tmp_path, {"architectures": ["DeepseekV3ForCausalLM"]})
    assert why and "kv_b_proj" in why and "merged model's GGUF" in why
    assert export.adapter_not_convertible(tmp_path, {"architectures": ["LlamaForCausalLM"]}) is None


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


def test_an_on_demand_stage_runs_only_in_a_run_that_asked_for_it():
    """Its own job or a selection of on-demand stages (the UI), or the CLI's request tag; not a "Materialize all"."""
    from types import SimpleNamespace

    from lora_pipeline.assets.handoff import HANDOFF_STAGES, REQUESTED_TAG, not_requested
    from lora_pipeline.cli.selection import ON_DEMAND

    assert set(HANDOFF_STAGES) == set(ON_DEMAND)

    def context(selection, tags=None, job_assets=()):
        layer = SimpleNamespace(executable_asset_keys={dg.AssetKey(name) for name in job_assets})
        return SimpleNamespace(asset_key=dg.AssetKey("gguf_export"), job_def=SimpleNamespace(asset_layer=layer),
                               run=SimpleNamespace(tags=tags or {}, asset_selection={dg.AssetKey(n) for n in selection}))

    assert not_requested(context([], job_assets=["gguf_export"])) is None  # the export job, or the asset alone
    assert not_requested(context([], job_assets=["champion", "gguf_export"])) is not None
    assert not_requested(context(["gguf_export"])) is None
    assert not_requested(context(["gguf_export", "published_model"])) is None
    everything = ["raw_dataset", "trained_adapter", "champion", "gguf_export", "published_model"]
    assert "Run the 'export' job" in not_requested(context(everything))
    assert not_requested(context(everything, {REQUESTED_TAG: "gguf_export"})) is None
    assert not_requested(context(everything, {REQUESTED_TAG: "published_model"})) is not None


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
    # Every held-out example and its prompt, tokenized by llama.cpp as by the model's tokenizer.
    assert meta["tokenizer_texts_checked"] == meta["tokenizer_texts_equal"] > 20
    assert meta["tokenizer_first_differing_text"] is None
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


@pytest.fixture(scope="module")
def micro_gguf(micro_base, tmp_path_factory) -> Path:
    return export.convert_model(micro_base, tmp_path_factory.mktemp("gguf") / "micro.f16.gguf", "f16", CACHE)


def _gguf_value(path: Path, key: str):
    from gguf import GGUFReader

    return GGUFReader(path).fields[key].contents()


def test_llama_cpp_splits_the_built_in_tokenizers_text_as_transformers_does(micro_base, micro_gguf):
    check = tokens.check_tokenization(micro_gguf, micro_base, BUILT_IN_TEXTS, True, CACHE)
    assert check.all_equal, [difference.describe() for difference in check.differences]
    assert check.checked == len(BUILT_IN_TEXTS)
    # The built-in tokenizer adds no BOS (training never had one): the GGUF says so, and llama.cpp adds none.
    assert _gguf_value(micro_gguf, "tokenizer.ggml.add_bos_token") is False
    assert _gguf_value(micro_gguf, "tokenizer.ggml.add_eos_token") is False
    ids = llama_cpp_token_ids(micro_gguf, ["Sort the numbers", "<s>Sort the numbers"], CACHE)
    assert 0 not in ids[0] and ids[1].count(0) == 1  # <s> is id 0: once when the text has it, never added


def test_the_converters_flat_scores_split_words_otherwise_and_are_refused_naming_the_text(micro_base, micro_gguf,
                                                                                          tmp_path):
    import shutil

    from gguf import GGUFReader

    flat = tmp_path / "flat.gguf"
    shutil.copy(micro_gguf, flat)
    reader = GGUFReader(flat, mode="r+")
    scores = reader.fields["tokenizer.ggml.scores"]
    for index in scores.data:  # what convert_hf_to_gguf.py writes for a BPE without tokenizer.model
        scores.parts[index][0] = -1000.0
    reader.data.flush()
    check = tokens.check_tokenization(flat, micro_base, BUILT_IN_TEXTS, True, CACHE)
    # Merged left to right, the micro vocabulary spells "dragon:" "▁dragon" ":" where BPE gives "▁drag" "on:".
    assert check.equal < check.checked
    first = check.differences[0]
    assert first.text in BUILT_IN_TEXTS and first.hf != first.llama_cpp
    differing = check.checked - check.equal
    with pytest.raises(tokens.TokenizationMismatch, match=f"splits {differing} of 6 texts") as refused:
        check.require_equal(flat.name)
    assert repr(first.text) in str(refused.value)
    assert "'▁drag', 'on:'" in str(refused.value) and "'▁dragon', ':'" in str(refused.value)  # both splits


def test_an_export_whose_bos_rule_differs_is_refused_naming_the_text(micro_base, micro_adapter, tmp_path,
                                                                     monkeypatch):
    repair = export.repair_vocabulary

    def wrong_bos(gguf_file, model_dir, rule, **kwargs):  # as if the GGUF said: add a BOS, which training never had
        return repair(gguf_file, model_dir, tokens.SpecialTokenRule(True, rule.add_eos, rule.bos_token, rule.eos_token),
                      **kwargs)

    monkeypatch.setattr(export, "repair_vocabulary", wrong_bos)
    with pytest.raises(tokens.TokenizationMismatch, match=r"merged.f16.gguf: llama.cpp splits 6 of 6 texts") as refused:
        export.export_gguf(micro_base, micro_adapter, lambda: micro_base, tmp_path, "f16", CACHE, None, "alpaca",
                           texts=BUILT_IN_TEXTS)
    assert "'Sort the numbers from smallest to largest.'" in str(refused.value)
    assert "HF ['▁', 'Sort'" in str(refused.value) and "llama.cpp ['<s>', '▁', 'Sort'" in str(refused.value)
    # Or recorded only, for a gate to judge: the counts and the first text that differs.
    facts = export.export_gguf(micro_base, micro_adapter, lambda: micro_base, tmp_path / "recorded", "f16", CACHE,
                               None, "alpaca", texts=BUILT_IN_TEXTS, require_same_tokens=False)
    assert (facts["tokenizer_texts_checked"], facts["tokenizer_texts_equal"]) == (6, 0) == (
        facts["base_tokenizer_texts_checked"], facts["base_tokenizer_texts_equal"])
    assert facts["tokenizer_first_differing_text"] == BUILT_IN_TEXTS[0]


def test_q4_k_m_is_quantized_by_the_built_llama_quantize_and_keeps_the_tokenizer(micro_base, tmp_path):
    out = export.convert_model(micro_base, tmp_path / "micro.q4_k_m.gguf", "q4_k_m", CACHE)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["micro.q4_k_m.gguf"]
    assert tokens.check_tokenization(out, micro_base, BUILT_IN_TEXTS, True, CACHE).all_equal


def test_held_out_texts_are_the_examples_then_their_prompts_distinct(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1 a1</s>", "p2 a2</s>", "p1 a1</s>"], "prompt": ["p1 ", "p2 ", "p1 "]}),
                   tmp_path / "eval.parquet")
    assert tokens.held_out_texts(tmp_path / "eval.parquet") == ["p1 a1</s>", "p1 ", "p2 a2</s>", "p2 "]
    assert tokens.held_out_texts(tmp_path / "eval.parquet", limit=3) == ["p1 a1</s>", "p1 ", "p2 a2</s>"]
    assert tokens.adds_special_tokens("alpaca") and not tokens.adds_special_tokens("chatml")


# --- real families: their own tokenizer files around tiny random weights ------------------------------


# llama.cpp's DeepSeek converter takes num_key_value_heads as MLA's head count, which a real DeepSeek-V3 has
# equal to num_attention_heads (128); the tiny one must too.
FAMILY_SHAPE = {"deepseek-v3": lambda fields: {"num_key_value_heads": fields["num_attention_heads"]}}


def _family_base(name: str, tmp_path_factory) -> Path:
    """A tiny random model of the family with its real tokenizer, when its files are in the cache (make families)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.base.families import cached_tokenizer_dir, tiny_config

    found = cached_tokenizer_dir(name)
    if found is None:
        pytest.skip(f"the {name} tokenizer files are not cached (make families)")
    tokenizer = AutoTokenizer.from_pretrained(found)
    fields = tiny_config(name, tokenizer)
    fields.update(FAMILY_SHAPE.get(name, lambda _: {})(fields))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    """(base folder, its f16 GGUF) of a family, built and converted once for the tests that read it."""
    built: dict = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            base = _family_base(name, tmp_path_factory)
            built[name] = base, export.convert_model(base, tmp_path_factory.mktemp("gguf") / f"{name}.f16.gguf", "f16",
                                                     CACHE)
        return built[name]

    return get


def _chat(tokenizer, question: str, answer: str | None = None) -> str:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma3", "deepseek-v3"])
def test_real_families_tokenize_in_llama_cpp_as_in_transformers(family, family_gguf):
    from transformers import AutoTokenizer

    base, out = family_gguf(family)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rule = tokens.special_token_rule(tokenizer)
    assert _gguf_value(out, "tokenizer.ggml.add_bos_token") is rule.add_bos
    # Rendered by the family's own chat template, which writes its own BOS: formatted without special tokens.
    chats = [_chat(tokenizer, "Sort 12, 3 and 8 from smallest to largest."),
             _chat(tokenizer, "naïve café, 東京? ½ 😀", "Yes: 3, 8, 12.\n\nDone!")]
    # The Alpaca example ends in the family's own EOS. (A literal "</s>" is not Qwen3's EOS but an ordinary
    # token its tokenizer splits "</" "s" ">"; llama.cpp makes any "</s>" a control token at load, so text
    # holding one is tokenized differently there: a llama.cpp rule, which the export check would name.)
    plain = [text.replace("</s>", tokenizer.eos_token) for text in BUILT_IN_TEXTS]
    for texts, add_special_tokens in ((plain, True), (chats, False)):
        check = tokens.check_tokenization(out, base, texts, add_special_tokens, CACHE)
        assert check.all_equal, [difference.describe() for difference in check.differences]
    # BOS exactly once where there is one: written by the chat template (dropped by llama.cpp's chat code when
    # the GGUF adds its own) or added to plain text as the tokenizer adds it; Qwen3 has none.
    if tokenizer.bos_token_id is not None:
        ids = llama_cpp_token_ids(out, [tokens.as_llama_cpp_prompt(chats[0], rule), plain[0]], CACHE)
        template_writes_bos = chats[0].startswith(tokenizer.bos_token)
        assert [i.count(tokenizer.bos_token_id) for i in ids] == [int(rule.add_bos or template_writes_bos),
                                                                  int(rule.add_bos)]


# Each family's GGUF architecture, and how far its tensors are from the safetensors compared as written (names
# mapped, nothing else): what the converter changes and the read-back reproduces. Llama's q/k rows are permuted;
# Gemma 3 stores its RMSNorm weights (zero at init) + 1; DeepSeek's kv_b_proj is split into k_b and v_b, so as
# written its GGUF name is not in the file; Qwen3's are renamed only.
FAMILY_LAYOUT = {"qwen3": ("qwen3", None), "llama3": ("llama", 1e-2), "gemma3": ("gemma3", 0.99),
                 "deepseek-v3": ("deepseek2", "attn_kv_b")}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma3", "deepseek-v3"])
def test_real_families_read_back_as_their_weights_in_their_own_layout(family, family_gguf, monkeypatch):
    base, out = family_gguf(family)
    config = json.loads((base / "config.json").read_text())
    check = export.compare_with_safetensors(out, base, config)
    architecture, as_written = FAMILY_LAYOUT[family]
    assert (check.architecture, check.compared, check.not_compared, check.unmatched) == (
        architecture, check.tensors, (), ())
    assert 0 < check.max_abs_diff < 2e-3  # fp16 rounding, every tensor
    monkeypatch.setattr(export, "CONVERTER_RULES", {})  # compared as written
    if isinstance(as_written, str):
        with pytest.raises(KeyError, match=as_written):
            export.compare_with_safetensors(out, base, config)
    elif as_written is not None:
        assert export.compare_with_safetensors(out, base, config).max_abs_diff > as_written
    else:
        assert export.compare_with_safetensors(out, base, config) == check
