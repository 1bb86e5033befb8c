"""GGUF export for llama.cpp and Ollama: convert, verify, and write Ollama Modelfiles.

Dagster-free. The conversion runs llama.cpp's own converter scripts (convert_hf_to_gguf.py and
convert_lora_to_gguf.py) as subprocesses with this interpreter; q4_k_m goes through llama.cpp's own
llama-quantize. None of it is copied into this repository: llama_cpp.py takes the scripts from the
pinned llama-cpp-python source distribution on PyPI and builds the binaries from the llama.cpp
sources it vendors, once per cache folder. Every file written is read back with the `gguf` package
and compared with the safetensors weights, and the model's GGUF tokenizer is checked with llama.cpp's
own llama-tokenize against the model's Hugging Face tokenizer (tokens.py).
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

from lora_pipeline.errors import ConfigError

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
def _converter_source(model_dir: Path, scratch: Path):
    """The model folder as the converter should read it: every file linked, and tokenizer_config.json naming
    add_bos_token / add_eos_token as the model's tokenizer behaves (see tokens.converter_tokenizer_config).
    Yields (folder, rule); the folder keeps the model folder's name, which the converter writes as the
    model's name."""
    from transformers import AutoTokenizer

    rule = special_token_rule(AutoTokenizer.from_pretrained(model_dir))
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
                  llama_quantize: str | None = None) -> Path:
    """A Hugging Face model folder (weights + tokenizer) as one GGUF file of the given type, its tokenizer
    made to add special tokens and split text as the HF tokenizer does (tokens.repair_vocabulary).

    q4_k_m is quantized from an f16 file by llama_quantize, else by the llama-quantize built into the cache."""
    quantize = gguf_type not in CONVERTER_TYPES
    quantizer = check_quantize(gguf_type, llama_quantize)
    if quantize and quantizer is None:
        quantizer = str(tools_dir(cache) / "llama-quantize")
    scripts = converter_dir(cache)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    first = out_file.with_suffix(".f16.gguf") if quantize else out_file
    with _converter_source(model_dir, out_file.parent) as (source, rule):
        _run_converter(scripts, "convert_hf_to_gguf.py",
                       [str(source), "--outfile", str(first), "--outtype", "f16" if quantize else gguf_type])
    # Before quantizing: llama-quantize copies the tokenizer metadata as it finds it.
    repair_vocabulary(first, model_dir, rule)
    if quantize:
        done = subprocess.run([quantizer, str(first), str(out_file), QUANTIZE_TYPES[gguf_type]],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama-quantize failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        first.unlink()
    return out_file


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
    """What reading a GGUF file back found: its tensors and the largest difference from the source."""

    tensors: int
    max_abs_diff: float
    compared: int


def _dequantized(tensor):
    """One GGUF tensor as a float32 numpy array in the source's shape."""
    import numpy as np
    from gguf.quants import dequantize

    # GGUF lists dimensions innermost first; numpy's order is the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def read_tensors(path: Path) -> dict:
    """The tensors of a GGUF file, dequantized to float32 numpy arrays in the source's shape."""
    from gguf import GGUFReader

    return {tensor.name: _dequantized(tensor) for tensor in GGUFReader(path).tensors}


def _llama_permute(weights, heads: int):
    """The row order llama.cpp gives q/k projections (its rotary layout) applied to HF weights."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf_name: str, name_map) -> tuple[str, str]:
    """The GGUF name of an HF tensor (and its suffix: weight, lora_a or lora_b)."""
    for hf_suffix, gguf_suffix in ((".lora_A.weight", ".weight.lora_a"), (".lora_B.weight", ".weight.lora_b"),
                                   (".weight", ".weight"), (".bias", ".bias")):
        if hf_name.endswith(hf_suffix):
            stem = hf_name[: -len(hf_suffix)].removeprefix("base_model.model.")
            mapped = name_map.get_name(stem)
            if mapped is None:
                raise KeyError(f"no GGUF name for {hf_name}")
            return mapped + gguf_suffix, gguf_suffix
    raise KeyError(f"no GGUF name for {hf_name}")


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


def compare_with_safetensors(gguf_file: Path, weights: Path, config: dict) -> GgufCheck:
    """Read a GGUF file back and compare every tensor with the safetensors it was converted from.

    weights is a safetensors file or a model folder (sharded or not); config is the model's
    config.json (its heads and layers); q/k projections are compared in llama.cpp's row order.
    Raises if a source tensor is missing from the file or changed shape."""
    import gguf
    import numpy as np

    exported = {tensor.name: tensor for tensor in gguf.GGUFReader(gguf_file).tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    largest, compared = 0.0, 0
    for hf_name, values in _safetensors_tensors(weights):
        name, suffix = _gguf_name(hf_name, name_map)
        if suffix != ".weight.lora_a":
            if ".q_proj" in hf_name:
                values = _llama_permute(values, config["num_attention_heads"])
            elif ".k_proj" in hf_name:
                values = _llama_permute(values, config.get("num_key_value_heads", config["num_attention_heads"]))
        if name not in exported:
            raise KeyError(f"{gguf_file.name}: {name} (from {hf_name}) is missing")
        read_back = _dequantized(exported[name])
        if read_back.shape != values.shape:
            raise ValueError(f"{name}: shape {read_back.shape} in GGUF, {values.shape} in safetensors")
        largest = max(largest, float(np.abs(read_back - values).max()))
        compared += 1
    return GgufCheck(tensors=len(exported), max_abs_diff=largest, compared=compared)


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
    converted (for a hub base it may download them). An adapter that trains whole modules
    (modules_to_save, e.g. the demo's lm_head) has no GGUF form: then only the merged model is
    written, and the facts say why.

    texts (the held-out examples) are tokenized by llama.cpp with each model GGUF and by the model's own
    tokenizer, which adds special tokens as formatting did (add_special_tokens: False for a chat template);
    any text split differently refuses the export (TokenizationMismatch, naming the texts and both splits),
    since llama.cpp and Ollama would then prompt the model otherwise than it was trained; with
    require_same_tokens=False it is only recorded, for a gate to judge. Returns plain facts for the asset's
    metadata, the merged file's tokenizer check among them (tokenizer_texts_checked, tokenizer_texts_equal,
    tokenizer_first_differing_text)."""
    config = json.loads((merged_dir / "config.json").read_text())
    facts: dict = {"gguf_type": gguf_type}

    def converted(label: str, target: Path, weights: Path, quantized_by_llama_cpp: bool, started: float) -> None:
        if quantized_by_llama_cpp:
            facts[f"{label}_tensors"] = len(read_tensors(target))  # llama-quantize's k-quants: no dequantized check
        else:
            check = compare_with_safetensors(target, weights, config)
            facts.update({f"{label}_tensors": check.tensors, f"{label}_max_abs_diff": check.max_abs_diff})
        facts.update({f"{label}_bytes": target.stat().st_size, f"{label}_file": target.name})
        progress(f"GGUF {label}: {target.name}, {target.stat().st_size / 2**20:,.1f} MiB, {facts[f'{label}_tensors']} "
                 f"tensors, converted and checked in {time.perf_counter() - started:.1f}s")

    def tokenizes_alike(label: str, target: Path, model_dir: Path) -> None:
        if not texts:
            return
        started = time.perf_counter()
        check = check_tokenization(target, model_dir, list(texts), add_special_tokens, cache)
        facts.update(check.facts("tokenizer" if label == "merged" else f"{label}_tokenizer"))
        progress(f"GGUF {label}: llama.cpp tokenizes {check.equal} of {check.checked} held-out texts as the model's "
                 f"tokenizer does ({time.perf_counter() - started:.1f}s)")
        if require_same_tokens:
            check.require_equal(target.name)

    by_quantize = gguf_type not in CONVERTER_TYPES
    trained_in_full = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save") or []
    if trained_in_full:
        # llama.cpp's adapter format holds lora_a/lora_b pairs only; its converter refuses full tensors.
        facts["adapter_skipped"] = (f"the adapter trains {', '.join(trained_in_full)} in full (lora.modules_to_save), "
                                    "which llama.cpp's LoRA format cannot hold: use the merged model's GGUF")
        progress(f"GGUF adapter and base not written: {facts['adapter_skipped']}")
    for label, locate in [("merged", lambda: merged_dir)] + ([] if trained_in_full else [("base", locate_base)]):
        model_dir = locate()
        started = time.perf_counter()
        target = convert_model(model_dir, out_dir / f"{label}.{gguf_type}.gguf", gguf_type, cache, llama_quantize)
        tokenizes_alike(label, target, model_dir)
        converted(label, target, model_dir, by_quantize, started)
    if not trained_in_full:
        started = time.perf_counter()
        # The merged folder has the base's config and tokenizer, all the adapter converter reads from --base.
        target = convert_adapter(adapter_dir, merged_dir, out_dir / "adapter.gguf", gguf_type, cache)
        converted("adapter", target, adapter_dir / "adapter_model.safetensors", False, started)
    if write_modelfile:
        eos = json.loads((merged_dir / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        (out_dir / "Modelfile").write_text(modelfile(f"./{facts['merged_file']}", template, eos=eos), encoding="utf-8")
        if not trained_in_full:
            (out_dir / "Modelfile.adapter").write_text(
                modelfile(f"./{facts['base_file']}", template, adapter_file=f"./{facts['adapter_file']}", eos=eos),
                encoding="utf-8")
    return facts
