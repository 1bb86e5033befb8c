"""GGUF export for llama.cpp and Ollama: convert, verify, and write Ollama Modelfiles.

Dagster-free. The conversion runs llama.cpp's own converter scripts (convert_hf_to_gguf.py and
convert_lora_to_gguf.py) as subprocesses with this interpreter; q4_k_m goes through llama.cpp's own
llama-quantize. None of it is copied into this repository: llama_cpp.py takes the scripts from the
pinned llama-cpp-python source distribution on PyPI and builds the binaries from the llama.cpp
sources it vendors, once per cache folder. Every file written is read back with the `gguf` package
and compared with the safetensors weights in the layout the converter wrote for the model's architecture
(names from the converter's own gguf-py, its per-architecture transformations reproduced: CONVERTER_RULES;
what is not reproduced is reported as not compared), and the model's GGUF tokenizer is checked with
llama.cpp's own llama-tokenize against the model's Hugging Face tokenizer (tokens.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lora_pipeline.errors import ConfigError, ModelError

# Re-exported: where the scripts and binaries are cached is part of this module's interface.
from lora_pipeline.ml.export.llama_cpp import (  # noqa: F401
    LLAMA_CPP_PYTHON_VERSION,
    converter_dir,
    default_cache,
    tools_dir,
)
from lora_pipeline.ml.export.tokens import (
    check_tokenization,
    converter_tokenizer_config,
    read_gguf,
    repair_vocabulary,
    special_token_rule,
)

logger = logging.getLogger(__name__)

# Types the Python converters write themselves; anything else goes through llama-quantize.
CONVERTER_TYPES = ("f16", "q8_0")
QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M"}


def _run_converter(scripts: Path, script: str, args: list[str]) -> None:
    """Run one converter script with this interpreter; its output is in the error if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(scripts / "gguf-py")}
    done = subprocess.run([sys.executable, str(scripts / script), *args], cwd=scripts, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def check_quantize(gguf_type: str, llama_quantize: str | None) -> str | None:
    """The llama-quantize binary the user named for a type that needs one (None: the converters' own types,
    or llama.cpp's own built into the cache on first use); refuses clearly before any conversion starts."""
    if gguf_type in CONVERTER_TYPES:
        return None
    if gguf_type not in QUANTIZE_TYPES:
        raise ConfigError(f"export.gguf: unknown type {gguf_type!r} (use f16, q8_0 or q4_k_m)")
    if llama_quantize and shutil.which(llama_quantize) is None:
        raise ConfigError(f"export.llama_quantize: {llama_quantize!r} is not an executable")
    return llama_quantize or None


@contextmanager
def _converter_source(model_dir: Path, scratch: Path, tokenizer=None):
    """The model folder as the converter should read it: every file linked, and tokenizer_config.json naming
    add_bos_token / add_eos_token as the model's tokenizer (tokenizer, if loaded) behaves (see
    tokens.converter_tokenizer_config). Yields (folder, rule); the folder keeps the model folder's name, which the
    converter writes as the model's name."""
    from transformers import AutoTokenizer

    rule = special_token_rule(tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir))
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".convert-") as parent:
        source = Path(parent) / model_dir.name
        source.mkdir()
        for item in model_dir.iterdir():
            if item.name != "tokenizer_config.json":
                (source / item.name).symlink_to(item.resolve())
        (source / "tokenizer_config.json").write_text(
            json.dumps(converter_tokenizer_config(model_dir, rule), indent=2, ensure_ascii=False), encoding="utf-8")
        yield source, rule


def convert_model(model_dir: Path, out_file: Path, gguf_type: str, cache: Path,
                  llama_quantize: str | None = None, tokenizer=None) -> Path:
    """A Hugging Face model folder (weights + tokenizer) as one GGUF file of the given type, its tokenizer
    made to add special tokens and split text as the HF tokenizer does (tokens.repair_vocabulary).

    q4_k_m is quantized from an f16 file by llama_quantize, else by the llama-quantize built into the cache.
    tokenizer: model_dir's, if the caller has it loaded."""
    return _convert_model(model_dir, out_file, gguf_type, cache, llama_quantize, tokenizer)[0]


def _convert_model(model_dir: Path, out_file: Path, gguf_type: str, cache: Path, llama_quantize: str | None,
                   tokenizer) -> tuple[Path, object | None]:
    """convert_model, and the file's reader as repair_vocabulary left it (None for a quantized file, which
    llama-quantize wrote anew): parsing a large vocabulary's GGUF takes seconds, so the read-back reuses it."""
    quantize = gguf_type not in CONVERTER_TYPES
    quantizer = check_quantize(gguf_type, llama_quantize)
    if quantize and quantizer is None:
        quantizer = str(tools_dir(cache) / "llama-quantize")
    scripts = converter_dir(cache)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    first = out_file.with_suffix(".f16.gguf") if quantize else out_file
    with _converter_source(model_dir, out_file.parent, tokenizer) as (source, rule):
        _run_converter(scripts, "convert_hf_to_gguf.py",
                       [str(source), "--outfile", str(first), "--outtype", "f16" if quantize else gguf_type])
    # Before quantizing: llama-quantize copies the tokenizer metadata as it finds it.
    reader = read_gguf(first, mode="r+")
    repair_vocabulary(first, model_dir, rule, reader=reader)
    if not quantize:
        return out_file, reader
    del reader
    done = subprocess.run([quantizer, str(first), str(out_file), QUANTIZE_TYPES[gguf_type]],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    first.unlink()
    return out_file, None


def convert_adapter(adapter_dir: Path, base_dir: Path, out_file: Path, gguf_type: str, cache: Path) -> Path:
    """A PEFT LoRA adapter folder as a GGUF adapter; the base folder gives its config (no hub)."""
    # llama.cpp's adapter converter writes f16/q8_0 only; a q4 adapter is not a thing llama.cpp reads.
    adapter_type = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    scripts = converter_dir(cache)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _run_converter(scripts, "convert_lora_to_gguf.py",
                   [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_file), "--outtype", adapter_type])
    return out_file


@dataclass(frozen=True)
class GgufCheck:
    """What reading a GGUF file back found: its tensors, how many were compared with the source and the largest
    difference, the source tensors not compared (each with why), and the file's tensors no compared source
    tensor accounts for."""

    tensors: int
    max_abs_diff: float
    compared: int
    architecture: str = ""
    not_compared: tuple[tuple[str, str], ...] = ()  # (source tensor name, why it was not compared)
    # GGUF tensors no compared source tensor maps to: made by the converter from none (llama's rope_freqs for
    # Llama 3 RoPE scaling) or from a source tensor in not_compared.
    unmatched: tuple[str, ...] = ()

    def facts(self, label: str) -> dict:
        """Plain values for an asset's metadata, each key prefixed with label."""
        return {f"{label}_tensors": self.tensors, f"{label}_max_abs_diff": self.max_abs_diff,
                f"{label}_tensors_compared": self.compared, f"{label}_tensors_not_compared": len(self.not_compared),
                f"{label}_not_compared": "; ".join(f"{name} ({why})" for name, why in self.not_compared) or None}


def _dequantized(tensor):
    """One GGUF tensor as a float32 numpy array in the source's shape."""
    import numpy as np
    from gguf.quants import dequantize

    # GGUF lists dimensions innermost first; numpy's order is the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def read_tensors(path: Path) -> dict:
    """The tensors of a GGUF file, dequantized to float32 numpy arrays in the source's shape."""
    return {tensor.name: _dequantized(tensor) for tensor in read_gguf(path).tensors}


def _llama_permute(weights, heads: int):
    """The row order llama.cpp gives q/k projections (its rotary layout) applied to HF weights."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# What llama.cpp's converter class for a Hugging Face architecture (config.json's `architectures`) does to tensors
# beyond renaming them, read from the pinned converter's conversion/*.py; keyed by the HF architecture, not the
# GGUF one, since several classes write one GGUF architecture differently (MistralModel writes no permutation).
# An architecture missing here is compared as written: a transformation not reproduced shows as a difference.
CONVERTER_RULES = {
    **dict.fromkeys(("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM"), "llama"),  # LlamaModel
    **dict.fromkeys(("Qwen2ForCausalLM", "Qwen3ForCausalLM"), "renamed"),  # Qwen2Model, Qwen3Model: names only
    **dict.fromkeys(("GemmaForCausalLM", "Gemma2ForCausalLM"), "gemma"),  # GemmaModel, Gemma2Model
    "Gemma3ForCausalLM": "gemma3",  # Gemma3Model
    **dict.fromkeys(("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"), "deepseek2"),  # DeepseekV2Model
}
# The converter drops these from every model (ModelBase.prepare_tensors).
_ALWAYS_DROPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
_KINDS = ((".lora_A.weight", "lora_a", ".weight.lora_a"), (".lora_B.weight", "lora_b", ".weight.lora_b"),
          (".weight", "weight", ".weight"), (".bias", "bias", ".bias"))


def hf_architecture(config: dict) -> str | None:
    """The architecture llama.cpp's converter picks its class by: config.json's first `architectures`, or its
    text_config's (get_model_architecture in the converter)."""
    text = config.get("text_config") or {}
    names = text.get("architectures") or config.get("architectures") or []
    return names[0] if names else None


def _vocabulary_rows(folder: Path) -> int | None:
    """The embedding rows Gemma3Model keeps (it drops rows past the vocabulary): len(vocab) + len(added_tokens) of
    tokenizer.json, counted as it counts them; None when it counts otherwise (tokenizer.model) or cannot here."""
    path = folder / "tokenizer.json"
    if (folder / "tokenizer.model").is_file() or not path.is_file():
        return None
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    return len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])


def _converted_form(stem: str, kind: str, values, rules: str | None, config: dict, embedding_rows: int | None):
    """The tensors convert_hf_to_gguf.py / convert_lora_to_gguf.py write for one source tensor, as a list of
    (HF-style stem to name, expected values), or a string saying why it is not compared (dropped by the converter,
    or transformed in a way not reproduced here). stem is the source name without its suffix; kind is weight,
    bias, lora_a or lora_b (a LoRA pair is transformed as the product B @ A would be: row changes go to B)."""
    import numpy as np

    lora = kind in ("lora_a", "lora_b")
    layer = next((int(part) for part in stem.split(".") if part.isdecimal()), None)
    if rules == "llama" and kind != "lora_a" and stem.endswith(("q_proj", "k_proj")):
        # LlamaModel.modify_tensors: q with the attention heads, k with the key/value heads.
        heads = config["num_attention_heads"]
        if stem.endswith("k_proj"):
            heads = config.get("num_key_value_heads") or heads
        return [(stem, _llama_permute(values, heads))]
    if rules in ("gemma", "gemma3"):
        if rules == "gemma" and stem == "lm_head":
            return "dropped by the converter (GemmaModel/Gemma2Model skip lm_head: the output is the embeddings)"
        if stem.endswith("norm") and kind == "weight":
            # Gemma's RMSNorm scales by 1 + weight; the converter stores 1 + weight.
            return [(stem, values + np.float32(1.0))]
        if rules == "gemma3" and stem.endswith("embed_tokens"):
            if lora:
                return "a LoRA of the embeddings is sliced and transposed by the converter, not reproduced here"
            if embedding_rows is None:
                return "the converter drops embedding rows past its count of the vocabulary, not reproduced here"
            return [(stem, values[:embedding_rows])]
    if rules == "deepseek2":
        if stem in ("lm_head", "model.lm_head") and config.get("tie_word_embeddings", False):
            return "dropped by the converter (tied to the embeddings, which llama.cpp uses as the output)"
        if layer is not None and layer >= config["num_hidden_layers"]:
            return "dropped by the converter (a multi-token-prediction layer, which llama.cpp does not run)"
        if ".mlp.experts." in stem:
            return "the converter stacks the experts into one tensor per layer, not reproduced here"
        if stem.endswith("kv_b_proj"):
            if kind != "weight":
                return "the converter splits kv_b_proj into k_b and v_b, not reproduced here for this tensor"
            # DeepseekV2Model.modify_tensors: per key/value head, the first qk_nope_head_dim rows are k_b (stored
            # transposed), the next v_head_dim rows v_b; MLA's absorption needs them apart.
            heads, nope, v = config["num_key_value_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
            per_head = values.reshape(heads, nope + v, values.shape[-1])
            return [(stem.replace("kv_b_proj", "k_b_proj"), np.ascontiguousarray(per_head[:, :nope].swapaxes(1, 2))),
                    (stem.replace("kv_b_proj", "v_b_proj"), np.ascontiguousarray(per_head[:, nope:]))]
    return [(stem, values)]


def _safetensors_tensors(weights: Path):
    """(name, float32 numpy array) for every tensor of a safetensors file or of every one in a folder,
    one tensor at a time (a 7B model is never held twice in memory)."""
    from safetensors import safe_open

    files = sorted(weights.glob("*.safetensors")) if weights.is_dir() else [weights]
    for file in files:
        # The torch framework reads bf16, which numpy cannot.
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def compare_with_safetensors(gguf_file: Path, weights: Path, config: dict, cache: Path | None = None,
                             reader=None) -> GgufCheck:
    """Read a GGUF file back and compare every tensor that can be with the safetensors it was converted from.

    weights is a safetensors file or a model folder (sharded or not); config is the model's config.json. Names are
    mapped with the tensor name map of the converter's own gguf-py for the architecture it wrote
    (general.architecture), and the source is transformed as the converter class for config's architecture
    transforms it (CONVERTER_RULES: Llama's q/k permutation, Gemma's RMSNorm weights stored +1, DeepSeek's
    kv_b_proj split into k_b and v_b) before comparing. A source tensor the converter drops, or transforms in a
    way not reproduced here, is listed in not_compared with why, never counted as compared. reader: the file
    already opened with read_gguf, if the caller has it. Raises if a source tensor that should be in the file is
    missing from it or changed shape."""
    import numpy as np

    from lora_pipeline.ml.export.llama_cpp import converter_tensor_name_map

    reader = reader if reader is not None else read_gguf(gguf_file)
    exported = {tensor.name: tensor for tensor in reader.tensors}
    written = reader.fields.get("general.architecture")
    architecture = written.contents() if written is not None else "llama"
    blocks = reader.fields.get(f"{architecture}.block_count")  # an adapter's GGUF has none
    name_map = converter_tensor_name_map(cache or default_cache(), architecture,
                                         int(blocks.contents()) if blocks is not None else config["num_hidden_layers"])
    if name_map is None:
        raise ValueError(f"{gguf_file.name}: llama.cpp's gguf-py has no architecture {architecture!r}")
    rules = CONVERTER_RULES.get(hf_architecture(config))
    embedding_rows = _vocabulary_rows(weights if weights.is_dir() else weights.parent) if rules == "gemma3" else None
    largest, compared, matched, not_compared = 0.0, 0, set(), []
    for hf_name, values in _safetensors_tensors(weights):
        # ModelBase.filter_tensors' renames, before any other rule sees the name.
        name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias").replace("language_model.", "")
        if name.endswith(_ALWAYS_DROPPED):
            not_compared.append((hf_name, "dropped by the converter (not used by llama.cpp)"))
            continue
        suffix = next((s for s in _KINDS if name.endswith(s[0])), None)
        if suffix is None:
            not_compared.append((hf_name, "neither a weight, a bias nor a LoRA matrix"))
            continue
        stem = name[: -len(suffix[0])].removeprefix("base_model.model.")
        expected = _converted_form(stem, suffix[1], values, rules, config, embedding_rows)
        if isinstance(expected, str):
            not_compared.append((hf_name, expected))
            continue
        for target_stem, target_values in expected:
            mapped = name_map.get_name(target_stem)
            if mapped is None:
                # The converter fails on a name it cannot map: it made this one into something else.
                not_compared.append((hf_name, f"no {architecture} name for {target_stem} in llama.cpp's tensor map"))
                continue
            target = mapped + suffix[2]
            if target not in exported:
                raise KeyError(f"{gguf_file.name}: {target} (from {hf_name}) is missing")
            read_back = _dequantized(exported[target])
            if read_back.shape != target_values.shape:
                raise ValueError(f"{target}: shape {read_back.shape} in GGUF, {target_values.shape} in safetensors")
            largest = max(largest, float(np.abs(read_back - target_values).max()))
            compared += 1
            matched.add(target)
    return GgufCheck(tensors=len(exported), max_abs_diff=largest, compared=compared, architecture=architecture,
                     not_compared=tuple(not_compared), unmatched=tuple(sorted(set(exported) - matched)))


def check_convertible(config: dict, cache: Path) -> str:
    """The model's architecture (config.json's), when the pinned llama.cpp's convert_hf_to_gguf.py has a class for
    it; else ModelError saying that this llama.cpp cannot convert it, before any conversion starts."""
    from lora_pipeline.ml.export.llama_cpp import converter_architectures

    architecture = hf_architecture(config)
    if architecture not in converter_architectures(cache):
        raise ModelError(f"no GGUF export for {architecture or 'a model without config.json architectures'}: "
                         f"llama.cpp's convert_hf_to_gguf.py (from the pinned llama-cpp-python "
                         f"{LLAMA_CPP_PYTHON_VERSION}) has no converter for that architecture")
    return architecture


def adapter_not_convertible(adapter_dir: Path, config: dict) -> str | None:
    """Why llama.cpp's convert_lora_to_gguf.py cannot write this adapter as a GGUF adapter, or None if it can.

    Its format holds LoRA pairs only, so an adapter that trains whole modules (modules_to_save) has none; and for
    DeepSeek V2/V3 it splits kv_b_proj into k_b (transposed) and v_b per head, which it cannot do to a LoRA pair
    (NotImplementedError in its LoraTorchTensor.transpose), so an adapter of kv_b_proj fails there."""
    from safetensors import safe_open

    trained_in_full = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save") or []
    if trained_in_full:
        return (f"the adapter trains {', '.join(trained_in_full)} in full (lora.modules_to_save), "
                "which llama.cpp's LoRA format cannot hold: use the merged model's GGUF")
    if CONVERTER_RULES.get(hf_architecture(config)) == "deepseek2":
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
            if any(".kv_b_proj.lora_" in name for name in handle.keys()):
                return ("the adapter trains kv_b_proj, which llama.cpp's adapter converter (pinned llama-cpp-python "
                        f"{LLAMA_CPP_PYTHON_VERSION}) cannot split into DeepSeek's k_b and v_b as it does the "
                        "weights: use the merged model's GGUF, or leave kv_b_proj out of lora.target_modules")
    return None


# The project's prompt formats in Ollama's Go-template syntax (ollama.com/library Modelfile docs).
OLLAMA_TEMPLATES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "alpaca": ("{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n"
               "{{ .Response }}"),
}
OLLAMA_STOPS = {"chatml": ["<|im_end|>", "<|im_start|>"], "alpaca": ["### Instruction:"]}


def modelfile(from_file: str, template: str | None, adapter_file: str | None = None, eos: str | None = None) -> str:
    """An Ollama Modelfile: FROM a GGUF (and ADAPTER a GGUF adapter), with the template as TEMPLATE.

    Only ChatML and Alpaca have an Ollama spelling here; for a tokenizer's own or an inline Jinja
    template there is no TEMPLATE line, and Ollama takes the chat template the converter stored in
    the GGUF (tokenizer.chat_template). Plain text gets Ollama's raw prompt."""
    lines = [f"FROM {from_file}"]
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    if template in OLLAMA_TEMPLATES:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[template]}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in [*OLLAMA_STOPS[template], *([eos] if eos else [])]]
    elif eos:
        lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


def export_gguf(merged_dir: Path, adapter_dir: Path, locate_base: Callable[[], Path], out_dir: Path, gguf_type: str,
                cache: Path, llama_quantize: str | None, template: str | None, write_modelfile: bool = True,
                progress=logger.info, texts: list[str] | tuple[str, ...] = (), add_special_tokens: bool = True,
                require_same_tokens: bool = True) -> dict:
    """Convert the merged model, the base and the adapter into out_dir, check each, write Modelfiles.

    The base GGUF is what the adapter applies to (Ollama's FROM + ADAPTER, llama.cpp's --lora);
    locate_base gives the folder of the unquantized base weights, and is called only when the base is
    converted (for a hub base it may download them). An adapter llama.cpp's adapter converter cannot write
    (adapter_not_convertible: whole modules trained, e.g. the demo's lm_head; DeepSeek's kv_b_proj) has no GGUF
    form: then only the merged model is written, and the facts say why (adapter_skipped). A model whose
    architecture the pinned converter lacks is refused before anything is converted (check_convertible).

    texts (the held-out examples) are tokenized by llama.cpp with each model GGUF and by the model's own
    tokenizer, which adds special tokens as formatting did (add_special_tokens: False for a chat template);
    any text split differently refuses the export (TokenizationMismatch, naming the texts and both splits),
    since llama.cpp and Ollama would then prompt the model otherwise than it was trained; with
    require_same_tokens=False it is only recorded, for a gate to judge. Returns plain facts for the asset's
    metadata, the merged file's tokenizer check among them (tokenizer_texts_checked, tokenizer_texts_equal,
    tokenizer_first_differing_text)."""
    from transformers import AutoTokenizer

    config = json.loads((merged_dir / "config.json").read_text())
    check_convertible(config, cache)  # before any conversion starts
    facts: dict = {"gguf_type": gguf_type}

    def converted(label: str, target: Path, weights: Path, quantized_by_llama_cpp: bool, started: float,
                  reader=None) -> None:
        if quantized_by_llama_cpp:
            facts[f"{label}_tensors"] = len(read_tensors(target))  # llama-quantize's k-quants: no dequantized check
            checked = ""
        else:
            check = compare_with_safetensors(target, weights, config, cache, reader)
            facts.update(check.facts(label))
            checked = (f" ({check.compared} compared with the safetensors, max difference {check.max_abs_diff:.2g}"
                       + (f"; {len(check.not_compared)} not compared: "
                          + ", ".join(name for name, _ in check.not_compared) if check.not_compared else "") + ")")
        facts.update({f"{label}_bytes": target.stat().st_size, f"{label}_file": target.name})
        progress(f"GGUF {label}: {target.name}, {target.stat().st_size / 2**20:,.1f} MiB, {facts[f'{label}_tensors']} "
                 f"tensors{checked}, converted and checked in {time.perf_counter() - started:.1f}s")

    def tokenizes_alike(label: str, target: Path, model_dir: Path, tokenizer) -> None:
        if not texts:
            return
        started = time.perf_counter()
        check = check_tokenization(target, model_dir, list(texts), add_special_tokens, cache, tokenizer=tokenizer)
        facts.update(check.facts("tokenizer" if label == "merged" else f"{label}_tokenizer"))
        progress(f"GGUF {label}: llama.cpp tokenizes {check.equal} of {check.checked} held-out texts as the model's "
                 f"tokenizer does ({time.perf_counter() - started:.1f}s)")
        if require_same_tokens:
            check.require_equal(target.name)

    by_quantize = gguf_type not in CONVERTER_TYPES
    skipped = adapter_not_convertible(adapter_dir, config)
    if skipped:
        facts["adapter_skipped"] = skipped
        progress(f"GGUF adapter and base not written: {skipped}")
    for label, locate in [("merged", lambda: merged_dir)] + ([] if skipped else [("base", locate_base)]):
        model_dir = locate()
        started = time.perf_counter()
        # Loaded once for the converter's special-token flags and the tokenizer check (seconds for a large one).
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        target, reader = _convert_model(model_dir, out_dir / f"{label}.{gguf_type}.gguf", gguf_type, cache,
                                        llama_quantize, tokenizer)
        tokenizes_alike(label, target, model_dir, tokenizer)
        converted(label, target, model_dir, by_quantize, started, reader)
        del reader, tokenizer
    if not skipped:
        started = time.perf_counter()
        # The merged folder has the base's config and tokenizer, all the adapter converter reads from --base.
        target = convert_adapter(adapter_dir, merged_dir, out_dir / "adapter.gguf", gguf_type, cache)
        converted("adapter", target, adapter_dir / "adapter_model.safetensors", False, started)
    if write_modelfile:
        eos = json.loads((merged_dir / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        (out_dir / "Modelfile").write_text(modelfile(f"./{facts['merged_file']}", template, eos=eos), encoding="utf-8")
        if not skipped:
            (out_dir / "Modelfile.adapter").write_text(
                modelfile(f"./{facts['base_file']}", template, adapter_file=f"./{facts['adapter_file']}", eos=eos),
                encoding="utf-8")
    return facts
