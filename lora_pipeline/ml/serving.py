"""Whether vLLM can serve an adapter as a LoRA adapter, and the files that serve the champions. Dagster-free.

vLLM serves LoRA matrices on one shared base (`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`).
Its loader refuses what is not a pair of low-rank matrices: modules trained in full (modules_to_save),
DoRA magnitudes, trained biases; and `--max-lora-rank` takes only a few values, the largest 512. An
adapter it cannot load is still shipped, merged into its base and served as a model of its own.

An adapter is a correction to the weights it was trained against, so a QLoRA adapter belongs on the
quantized base, not on the unquantized one. The stored quantized_base folder is a bitsandbytes
checkpoint vLLM loads as it is, and the serving files point there (ServedBase, served_base()).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# A served name appears in shell commands, in `NAME=PATH` pairs and in request JSON; refusing a leading
# '.', '_' or '-' keeps it from ever reading as a command-line flag or a hidden file.
_SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FIRST_PORT = 8000  # vLLM's default port: the one a single server uses, the first of several


@dataclass(frozen=True)
class Servability:
    """Whether vLLM can serve the adapter as an adapter, its largest rank, and every reason it cannot."""

    servable: bool
    rank: int
    reasons: tuple[str, ...]

    @property
    def mode(self) -> str:
        """'adapter' when vLLM can load it as a LoRA adapter, else 'merged-only'."""
        return "adapter" if self.servable else "merged-only"

    def as_dict(self) -> dict:
        """Plain JSON-ready data, the mode included."""
        return {"servable": self.servable, "mode": self.mode, "rank": self.rank, "reasons": list(self.reasons)}


def servability(adapter_config: dict) -> Servability:
    """Check a PEFT adapter_config.json (as a dict) against what vLLM's LoRA loader accepts.

    A static check of the config only: one reason sentence per problem found, none when servable.
    """
    # rank_pattern overrides r for some modules; vLLM must be started with a max rank fitting the largest.
    pattern_ranks = [int(rank) for rank in (adapter_config.get("rank_pattern") or {}).values()]
    rank = max([int(adapter_config.get("r") or 0), *pattern_ranks])
    largest = VLLM_MAX_LORA_RANKS[-1]
    reasons = []
    peft_type = adapter_config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        reasons.append(f"peft_type {peft_type!r} is not LoRA: vLLM serves LoRA adapters only")
    if rank < 1:
        reasons.append("the config gives no LoRA rank (r): vLLM cannot size its LoRA slots for this adapter")
    if rank > largest:
        reasons.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({largest}), "
                       "so this adapter can only be served merged")
    saved = adapter_config.get("modules_to_save") or []
    if saved:
        reasons.append(f"modules_to_save {sorted(saved)} are trained in full: vLLM serves LoRA matrices only, "
                       "so this adapter can only be served merged")
    if adapter_config.get("use_dora"):
        reasons.append("DoRA (use_dora) adds trained magnitude vectors, which vLLM's LoRA serving does not load, "
                       "so this adapter can only be served merged")
    bias = adapter_config.get("bias") or "none"
    if bias != "none":
        reasons.append(f"bias {bias!r} trains the base's biases, which vLLM's LoRA serving does not load, "
                       "so this adapter can only be served merged")
    if adapter_config.get("lora_bias"):
        reasons.append("lora_bias trains a bias on the LoRA B matrices, which vLLM's LoRA serving does not load, "
                       "so this adapter can only be served merged")
    if adapter_config.get("trainable_token_indices"):
        reasons.append("trainable_token_indices trains embedding rows in full, which vLLM's LoRA serving does not "
                       "load, so this adapter can only be served merged")
    return Servability(servable=not reasons, rank=rank, reasons=tuple(reasons))


def read_servability(adapter_dir: Path) -> Servability:
    """servability() of a saved adapter folder, read from its adapter_config.json."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    return servability(json.loads(config_path.read_text(encoding="utf-8")))


def max_lora_rank_for(ranks: list[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that is at least every rank; ValueError above 512."""
    if not ranks:
        raise ValueError("no adapter rank given: --max-lora-rank needs at least one")
    needed = max(ranks)
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= needed:
            return allowed
    raise ValueError(f"rank {needed} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter to serve: the name requests use as "model", its folder (or hub id), its rank."""

    name: str
    path: str
    rank: int


# vLLM's BitsAndBytesConfig refuses 4-bit weights packed in anything else (bnb_4bit_quant_storage), which is
# what FSDP training stores them in; such a base has to be quantized again at load time, or served unquantized.
_VLLM_4BIT_STORAGE = "uint8"
# 'builtin:tiny-llama' names a model only this project can build; 'scheme://' is a remote folder, which
# SERVING.md asks to copy to the serving machine, after which vLLM loads it like any folder.
_NOT_LOADABLE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?!//)")
_MODE_WORDS = {"nf4": "NF4 4-bit", "fp4": "FP4 4-bit", "int8": "LLM.int8() 8-bit"}


@dataclass(frozen=True)
class ServedBase:
    """The base model the adapters are served on, and how they were trained against it.

    name: the config's base_model, which requests use for the bare base and lora-modules.json gives as
    base_model_name. path: what `vllm serve` loads, a hub id or a folder (None: the name itself);
    revision: the hub revision, for a hub id. quantization: the bitsandbytes mode the adapters were
    trained against (quantization.mode: nf4, fp4, int8; 'none' for plain LoRA), with double_quant;
    prequantized: path holds those quantized weights themselves (the quantized_base folder) rather
    than the unquantized ones. source_dtype, compute_dtype: the unquantized weights' dtype and the
    dtype training quantized them in (base_info.json), when known.
    """

    name: str
    path: str | None = None
    revision: str | None = None
    quantization: str = "none"
    double_quant: bool = False
    prequantized: bool = False
    source_dtype: str | None = None
    compute_dtype: str | None = None

    @property
    def location(self) -> str:
        """What `vllm serve` loads: the path, else the name itself."""
        return self.path or self.name

    @property
    def loading(self) -> str:
        """How the adapters meet the weights they were trained against.

        'as-is': plain LoRA on an unquantized base; 'prequantized': the stored quantized weights, loaded as
        they are; 'in-flight': vLLM quantizes the unquantized base while loading, with the training's scheme;
        'unquantized': neither is possible, so the adapters run on weights they were not trained against.
        """
        if self.quantization == "none":
            return "as-is"
        if self.prequantized:
            return "prequantized"
        # vLLM's in-flight bitsandbytes quantization is always NF4 with double-quantized constants, in
        # bitsandbytes' default blocks of 64: what transformers' BitsAndBytesConfig(nf4, double quant) does too.
        if self.quantization == "nf4" and self.double_quant:
            return "in-flight"
        return "unquantized"

    def vllm_options(self) -> list[tuple[str, str]]:
        """The `vllm serve` options (flag, value) that load this base as the adapters were trained against it."""
        options = []
        if self.revision:
            options.append(("--revision", self.revision))
        if self.location != self.name:
            options.append(("--served-model-name", self.name))
        if self.loading in ("prequantized", "in-flight"):
            # Current vLLM picks its bitsandbytes loader from this flag (EngineArgs.create_load_config); only
            # versions up to 0.6 also needed --load-format bitsandbytes.
            options.append(("--quantization", "bitsandbytes"))
        return options


def served_base(base_model: str, quantized_uri: str, base_info: dict, original_uri: str | None = None) -> ServedBase:
    """The base a candidate's adapters are served on, from its quantized_base artifact.

    base_info: the artifact's base_info.json; original_uri: the artifact's copy of the unquantized
    weights (kept for built-in bases), if it has one. A quantized base vLLM can load is served as
    stored, so the adapters run on the very weights they were trained against. Otherwise the
    unquantized base: base_model itself when vLLM can load it (a hub id or a folder, with its
    revision), else the stored copy. ValueError when vLLM cannot load base_model and no unquantized
    copy is stored.
    """
    mode = base_info.get("quantization", "none")
    trained = {"name": base_model, "quantization": mode,
               "double_quant": mode in ("nf4", "fp4") and bool(base_info.get("double_quant")),
               "source_dtype": base_info.get("source_dtype"), "compute_dtype": base_info.get("compute_dtype")}
    storage = base_info.get("quant_storage") or _VLLM_4BIT_STORAGE
    if mode == "int8" or (mode in ("nf4", "fp4") and storage == _VLLM_4BIT_STORAGE):
        return ServedBase(path=quantized_uri, prequantized=True, **trained)
    if _vllm_can_load(base_model):
        return ServedBase(path=base_model, revision=base_info.get("revision"), **trained)
    # Unquantized, the stored folder holds the base's own weights; quantized, it keeps them beside its own.
    unquantized = quantized_uri if mode == "none" else original_uri
    if unquantized is None:
        raise ValueError(f"base {base_model!r}: vLLM cannot load it by that name, and no unquantized copy is stored")
    return ServedBase(path=unquantized, **trained)


@dataclass(frozen=True)
class MeasuredDrift:
    """What eval_report measured of serving something other than the adapter on the base it was trained against:
    relative changes of held-out loss against that adapter, on `examples` held-out examples. None: not measured.

    unquantized_base: the adapter on the unquantized weights of its quantized base (merged into them, which
    computes the same); merged: the merged model, merged into `merge_weights` weights.
    """

    examples: int
    unquantized_base: float | None = None
    merged: float | None = None
    merge_weights: str | None = None

    @classmethod
    def from_metrics(cls, document: dict) -> "MeasuredDrift":
        """Read from an eval_report metrics.json document (or its "comparison" part)."""
        comparison = document.get("comparison", document)
        merged = comparison.get("merged_vs_adapter_loss_change")
        unquantized = comparison.get("merged_into_original_vs_adapter_loss_change")
        if unquantized is None and comparison.get("merge_weights") == "original":
            # The merged model is then itself the merge into the unquantized weights.
            unquantized = merged
        return cls(examples=int(comparison.get("examples") or 0), unquantized_base=unquantized, merged=merged,
                   merge_weights=comparison.get("merge_weights"))


def lora_module_argument(adapter: ServedAdapter, base_name: str) -> str:
    """One value of vLLM's `--lora-modules` for the adapter: NAME=PATH where vLLM reads that back as this name and
    path, else the JSON object (with base_model_name)."""
    # vLLM's LoRAParserAction reads a value with '=' and no ',' as NAME=PATH, split at every '=', and any other
    # value as one JSON object: a path holding '=' or ',' only survives in the object.
    if "=" not in adapter.path and "," not in adapter.path:
        return f"{adapter.name}={adapter.path}"
    return json.dumps(_module_object(adapter, base_name))


def _module_object(adapter: ServedAdapter, base_name: str) -> dict:
    """vLLM's LoRAModulePath as JSON: exactly its fields, as any other key makes vLLM refuse the value."""
    return {"name": adapter.name, "path": adapter.path, "base_model_name": base_name}


def serving_files(base_model: str | ServedBase, adapters: list[ServedAdapter],
                  merged_models: dict[str, str] | None = None, drift: MeasuredDrift | None = None,
                  chat_template: str | None = None) -> dict[str, str]:
    """The folder shipped with the champion, as file name -> text.

    base_model: the base the adapters were trained against, a ServedBase (see served_base()), or as a
    string a hub id or folder vLLM loads as it is, for plain LoRA. serve-vllm.sh starts vLLM's
    OpenAI-compatible server: that base with every adapter when there are adapters, else each merged
    model; lora-modules.json is a JSON list of the adapters, each the object one `--lora-modules`
    value takes; SERVING.md explains both to a person, with what eval_report measured (drift) of
    serving anything else than the adapter on its own base. ValueError on an invalid or repeated
    name, or, with adapters, on a base vLLM cannot load (a built-in model id).

    chat_template: the template the training data was rendered with; written as chat_template.jinja
    and passed with --chat-template, so the chat endpoint formats as training did, whatever template
    the served base's own tokenizer carries.
    """
    base = base_model if isinstance(base_model, ServedBase) else ServedBase(base_model)
    merged_models = dict(merged_models or {})
    _check_names([adapter.name for adapter in adapters] + list(merged_models))
    if not adapters and not merged_models:
        raise ValueError("nothing to serve: no adapter and no merged model")
    if adapters:
        if not _vllm_can_load(base.location):
            raise ValueError(f"base {base.location!r} is not a hub id or folder vLLM can load: serve the adapters "
                             "on the stored base folder (served_base())")
        script = _adapter_script(base, adapters, merged_models)
    else:
        script = _merged_script(merged_models)
    modules = [_module_object(adapter, base.name) for adapter in adapters]
    files = {
        "serve-vllm.sh": _with_chat_template(script) if chat_template else script,
        "lora-modules.json": json.dumps(modules, indent=2) + "\n",
        "SERVING.md": _serving_doc(base, adapters, merged_models, drift, bool(chat_template)),
    }
    if chat_template:
        files[CHAT_TEMPLATE_FILE] = chat_template
    return files


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _with_chat_template(script: str) -> str:
    """Every `vllm serve` in the script given the training template, found beside the script wherever it runs from."""
    option = f'--chat-template "$here/{CHAT_TEMPLATE_FILE}"'
    lines = []
    for line in script.splitlines():
        if line.startswith("set -euo pipefail"):
            lines += [line, 'here="$(cd "$(dirname "$0")" && pwd)"']
            continue
        for command in ("exec vllm serve ", "vllm serve ", "# vllm serve "):
            if line.startswith(command):
                path, _, rest = line[len(command):].partition(" ")
                line = f"{command}{path} {option}" + (f" {rest}" if rest else "")
                break
        lines.append(line)
    return "\n".join(lines) + "\n"


def _vllm_can_load(location: str) -> bool:
    """Whether `vllm serve` can be given this as it is: a hub id or a folder (remote ones once copied)."""
    return bool(location) and not _NOT_LOADABLE.match(location)


def _check_names(names: list[str]) -> None:
    """ValueError on a name vLLM's `NAME=PATH` or a request could not carry, or on one used twice."""
    for name in names:
        if not _SERVED_NAME.fullmatch(name):
            raise ValueError(f"served model name {name!r}: use letters, digits, '.', '_' and '-', "
                             "starting with a letter or digit")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"served model names repeat: {repeated}; each request picks a model by its name")


_SCRIPT_HEAD = [
    "#!/usr/bin/env bash",
    "# Written by lora-pipeline with the champion: starts vLLM's OpenAI-compatible server (see SERVING.md).",
    "# Extra arguments are passed on to vllm serve, e.g. --port 8080 --gpu-memory-utilization 0.85.",
    "set -euo pipefail",
]


def _base_comment(base: ServedBase) -> list[str]:
    """The script's reason for loading the base the way it does."""
    loading = base.loading
    if loading == "as-is":
        if base.location == base.name:
            return []
        return [f"# vLLM cannot load {base.name} by that name: this folder holds its weights."]
    words = _MODE_WORDS.get(base.quantization, base.quantization)
    if loading == "prequantized":
        return [f"# The adapters were trained against this {words} bitsandbytes base: vLLM loads it as stored."]
    if loading == "in-flight":
        return ["# The adapters were trained against the NF4 (double-quantized) base: vLLM quantizes it the same "
                "way while loading."]
    return [f"# WARNING: the adapters were trained against the {words} base, which vLLM cannot reproduce: on these "
            "unquantized weights they make a different model (see SERVING.md)."]


def _adapter_script(base: ServedBase, adapters: list[ServedAdapter], merged_models: dict[str, str]) -> str:
    """One server: the base loaded once, every adapter on it, any batch mixing up to all of them."""
    # One --lora-modules with every adapter after it: vLLM's action replaces the list on each occurrence.
    modules = " \\\n    ".join(shlex.quote(lora_module_argument(adapter, base.name)) for adapter in adapters)
    lines = [*_SCRIPT_HEAD, "", *_base_comment(base),
             f"exec vllm serve {shlex.quote(base.location)} \\",
             *[f"  {flag} {shlex.quote(value)} \\" for flag, value in base.vllm_options()],
             "  --enable-lora \\",
             f"  --lora-modules {modules} \\",
             f"  --max-lora-rank {max_lora_rank_for([adapter.rank for adapter in adapters])} \\",
             f"  --max-loras {len(adapters)} \\",
             '  "$@"']
    if merged_models:
        # exec above never returns, so these are left for a person to run on another port or machine.
        lines += ["", "# Merged-only models (vLLM cannot load them as adapters) need a server of their own:"]
        for port, (name, path) in enumerate(merged_models.items(), start=_FIRST_PORT + 1):
            lines.append(f"# vllm serve {shlex.quote(path)} --served-model-name {shlex.quote(name)} --port {port}")
    return "\n".join(lines) + "\n"


def _merged_script(merged_models: dict[str, str]) -> str:
    """One server per merged model: a merged model is a whole model, not something to share a base."""
    lines = [*_SCRIPT_HEAD, ""]
    if len(merged_models) == 1:
        (name, path), = merged_models.items()
        lines += [f"# {name} is merged-only: vLLM cannot load it as a LoRA adapter, so the merged model is served.",
                  f"exec vllm serve {shlex.quote(path)} --served-model-name {shlex.quote(name)} \"$@\""]
        return "\n".join(lines) + "\n"
    # Several servers cannot share a port: each gets the next one, and when one stops the script stops
    # the others, so a half-running set is never mistaken for a healthy one.
    lines += ["pids=()", "trap 'kill \"${pids[@]}\" 2>/dev/null || true' EXIT", ""]
    for port, (name, path) in enumerate(merged_models.items(), start=_FIRST_PORT):
        lines += [f"# {name} is merged-only: vLLM cannot load it as a LoRA adapter, so the merged model is served.",
                  f"vllm serve {shlex.quote(path)} --served-model-name {shlex.quote(name)} --port {port} \"$@\" &",
                  "pids+=(\"$!\")"]
    lines += ["", "wait -n"]
    return "\n".join(lines) + "\n"


def _percent(change: float) -> str:
    """A relative change as a signed percentage to 3 significant digits: a small drift stays visible."""
    return f"{change * 100:+.3g}%"


def _unquantized_drift(drift: MeasuredDrift | None) -> str:
    """What eval_report measured of the adapter on the unquantized weights, or that it did not."""
    if drift is None or drift.unquantized_base is None:
        return ("eval_report did not measure how far that moves this candidate (it does for a quantized base with "
                "eval.compare_merge_bases).")
    return (f"eval_report measured it: the adapter on the unquantized weights scored "
            f"{_percent(drift.unquantized_base)} held-out loss against the adapter on its quantized base, on "
            f"{drift.examples} held-out examples.")


def _merged_drift(drift: MeasuredDrift | None) -> str:
    """The merged model's measured drift from the adapter, as a clause, or nothing when not measured."""
    if drift is None or drift.merged is None:
        return ""
    return (f" (merged into {drift.merge_weights} weights; eval_report measured {_percent(drift.merged)} held-out "
            f"loss against the adapter on {drift.examples} held-out examples)")


def _base_doc(base: ServedBase, drift: MeasuredDrift | None) -> list[str]:
    """SERVING.md's account of the base the adapters run on, and why it is the one they were trained against."""
    loading = base.loading
    where = f"`{base.location}`" + (f" at revision `{base.revision}`" if base.revision else "")
    renamed = (f" `--served-model-name` keeps `{base.name}` as the name requests use for the bare base."
               if base.location != base.name else "")
    if loading == "as-is":
        if base.location == base.name:
            # The name alone would load the hub's newest revision, not the one the adapters were trained on.
            return [f"vLLM loads the base from {where}.", ""] if base.revision else []
        return [f"vLLM cannot load `{base.name}` by that name (it is not a hub id or a folder), so it loads the "
                f"stored copy of the base's weights, {where}.{renamed}", ""]
    words = _MODE_WORDS.get(base.quantization, base.quantization)
    scheme = f"{words}{', double-quantized constants' if base.double_quant else ''}"
    trained = f"The adapters were trained against the base quantized by bitsandbytes ({scheme})."
    if loading == "prequantized":
        return [f"{trained} {where} is that quantized base as the pipeline stored it: vLLM reads the bitsandbytes "
                "quantization from its config.json and loads the quantized weights as they are "
                "(`--quantization bitsandbytes`), so the adapters run on the very weights they were trained "
                f"against.{renamed} vLLM does not split a pre-quantized bitsandbytes checkpoint with tensor "
                "parallelism: on several GPUs use `--pipeline-parallel-size`.", "",
                f"Serving the adapters on the unquantized `{base.name}` instead would make a different model. "
                f"{_unquantized_drift(drift)}", ""]
    if loading == "in-flight":
        if base.source_dtype and base.compute_dtype and base.source_dtype == base.compute_dtype:
            exact = (f"Training quantized the same {base.source_dtype} values the same way, so vLLM arrives at "
                     "the same 4-bit weights (by construction; not measured here).")
        elif base.source_dtype and base.compute_dtype:
            exact = (f"Training quantized the weights cast to {base.compute_dtype}, while vLLM quantizes the "
                     f"checkpoint's {base.source_dtype} values, so some 4-bit values may round differently "
                     "(not measured).")
        else:
            exact = ("The 4-bit weights match exactly only if training quantized the checkpoint's own dtype "
                     "(not recorded here).")
        return [f"{trained} vLLM quantizes the unquantized {where} while loading it (`--quantization "
                "bitsandbytes`): its in-flight quantization is NF4 in blocks of 64 with double-quantized constants, "
                f"the scheme the adapters were trained against. {exact}{renamed}", "",
                f"Serving the adapters on the unquantized weights (without `--quantization bitsandbytes`) would "
                f"make a different model. {_unquantized_drift(drift)}", ""]
    return [f"**The adapters are not served on the base they were trained against.** {trained} vLLM cannot load "
            "that quantized folder and quantizes in flight only to NF4 with double-quantized constants, so "
            f"`serve-vllm.sh` loads the unquantized {where}: with the adapters, a different model than the one "
            f"evaluated. {_unquantized_drift(drift)}{renamed}", "",
            f"To serve what was evaluated, serve the candidate's merged model (the merged_model artifact)"
            f"{_merged_drift(drift)} instead.", ""]


def _serving_doc(base: ServedBase, adapters: list[ServedAdapter], merged_models: dict[str, str],
                 drift: MeasuredDrift | None, chat_template: bool = False) -> str:
    """SERVING.md: what is served and how, on which base, what is merged-only and why, and a request to try."""
    doc = ["# Serving with vLLM", "", f"Base model: `{base.name}`.", ""]
    if chat_template:
        doc += [f"`{CHAT_TEMPLATE_FILE}` is the chat template the training data was rendered with; every server "
                "gets it with `--chat-template`, so `/v1/chat/completions` puts a conversation into the same "
                "tokens as training did (the champion's template_fidelity gate checked it on held-out "
                "conversations).", ""]
    if adapters:
        doc += _base_doc(base, drift)
        doc += [f"`serve-vllm.sh` starts one vLLM server on port {_FIRST_PORT} with the base loaded once and "
                f"{len(adapters)} LoRA adapter(s) on it; a request picks one by its name as `\"model\"`, and the "
                f"bare base answers to `{base.name}`.", ""]
        doc += [f"- `{adapter.name}`: LoRA adapter, rank {adapter.rank}, at `{adapter.path}`" for adapter in adapters]
        doc += ["", f"`--max-lora-rank {max_lora_rank_for([adapter.rank for adapter in adapters])}` is the smallest "
                "value vLLM accepts that fits every adapter's rank; `--max-loras` lets every adapter take part in "
                "one batch.", "",
                "`lora-modules.json` lists the same adapters as a JSON list of objects; each object is what one "
                "`--lora-modules` value takes (`name`, `path`, `base_model_name`). vLLM does not accept the list "
                "itself: give each object as its own value after a single `--lora-modules` (given twice, the "
                "second replaces the first), e.g. in bash", "",
                "```bash",
                "mapfile -t modules < <(jq -c '.[]' lora-modules.json)",
                f"vllm serve {shlex.quote(base.location)} "
                + "".join(f"{flag} {shlex.quote(value)} " for flag, value in base.vllm_options())
                + "--enable-lora --lora-modules \"${modules[@]}\"",
                "```", ""]
    if merged_models:
        doc += ["Merged-only: vLLM's LoRA loader refuses these adapters (modules trained in full with "
                "modules_to_save, DoRA, trained biases, or a rank above 512), so the adapter was merged into "
                "the base and the merged model is served as a model of its own. The champion's serving "
                "metadata names the exact reason.", ""]
        doc += [f"- `{name}`: merged model at `{path}`" for name, path in merged_models.items()]
        if len(merged_models) == 1 and drift is not None and drift.merged is not None:
            (name, _), = merged_models.items()
            doc += ["", f"`{name}` was merged into {drift.merge_weights} weights; eval_report measured it at "
                    f"{_percent(drift.merged)} held-out loss against the adapter it was merged from, on "
                    f"{drift.examples} held-out examples."]
        if adapters:
            doc += ["", "They are not in `serve-vllm.sh`'s server; the script's last comments give the command "
                    "for each, on its own port."]
        elif len(merged_models) > 1:
            doc += ["", f"`serve-vllm.sh` starts one server per merged model, on ports {_FIRST_PORT} onwards in "
                    "this order."]
        doc += [""]
    paths = [adapter.path for adapter in adapters] + list(merged_models.values())
    if adapters:
        paths.append(base.location)
    if any("://" in path for path in paths):
        doc += ["Some paths above are remote: vLLM loads a local folder or a Hugging Face repo id, so copy "
                "those folders to the serving machine and change the paths in `serve-vllm.sh`.", ""]
    example = adapters[0].name if adapters else next(iter(merged_models))
    doc += ["Start the server with `bash serve-vllm.sh`, then ask it through the OpenAI-compatible endpoint:", "",
            "```bash",
            f"curl http://localhost:{_FIRST_PORT}/v1/completions -H 'Content-Type: application/json' \\",
            f"  -d '{{\"model\": \"{example}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'",
            "```", ""]
    return "\n".join(doc)
