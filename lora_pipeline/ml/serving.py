"""Whether vLLM can serve an adapter as a LoRA adapter, and the files that serve the champions. Dagster-free.

vLLM serves LoRA matrices on one shared base (`vllm serve BASE --enable-lora --lora-modules NAME=PATH ...`).
Its loader refuses what is not a pair of low-rank matrices: modules trained in full (modules_to_save),
DoRA magnitudes, trained biases; and `--max-lora-rank` takes only a few values, the largest 512. An
adapter it cannot load is still shipped, merged into its base and served as a model of its own.
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


def serving_files(base_model: str, adapters: list[ServedAdapter],
                  merged_models: dict[str, str] | None = None) -> dict[str, str]:
    """The folder shipped with the champion, as file name -> text.

    serve-vllm.sh starts vLLM's OpenAI-compatible server: the base with every adapter when there are
    adapters, else each merged model; lora-modules.json lists the adapters as vLLM's JSON form of
    --lora-modules; SERVING.md explains both to a person. ValueError on an invalid or repeated name.
    """
    merged_models = dict(merged_models or {})
    _check_names([adapter.name for adapter in adapters] + list(merged_models))
    if not adapters and not merged_models:
        raise ValueError("nothing to serve: no adapter and no merged model")
    if adapters:
        script = _adapter_script(base_model, adapters, merged_models)
    else:
        script = _merged_script(merged_models)
    modules = [{"name": adapter.name, "path": adapter.path, "base_model_name": base_model} for adapter in adapters]
    return {
        "serve-vllm.sh": script,
        "lora-modules.json": json.dumps(modules, indent=2) + "\n",
        "SERVING.md": _serving_doc(base_model, adapters, merged_models),
    }


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


def _adapter_script(base_model: str, adapters: list[ServedAdapter], merged_models: dict[str, str]) -> str:
    """One server: the base loaded once, every adapter on it, any batch mixing up to all of them."""
    modules = " \\\n    ".join(shlex.quote(f"{adapter.name}={adapter.path}") for adapter in adapters)
    lines = [*_SCRIPT_HEAD, "",
             f"exec vllm serve {shlex.quote(base_model)} \\",
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


def _serving_doc(base_model: str, adapters: list[ServedAdapter], merged_models: dict[str, str]) -> str:
    """SERVING.md: what is served and how, what is merged-only and why, and a request to try."""
    doc = ["# Serving with vLLM", "", f"Base model: `{base_model}`.", ""]
    if adapters:
        doc += [f"`serve-vllm.sh` starts one vLLM server on port {_FIRST_PORT} with the base loaded once and "
                f"{len(adapters)} LoRA adapter(s) on it; a request picks one by its name as `\"model\"`, and the "
                "bare base answers to the base model's name.", ""]
        doc += [f"- `{adapter.name}`: LoRA adapter, rank {adapter.rank}, at `{adapter.path}`" for adapter in adapters]
        doc += ["", f"`--max-lora-rank {max_lora_rank_for([adapter.rank for adapter in adapters])}` is the smallest "
                "value vLLM accepts that fits every adapter's rank; `--max-loras` lets every adapter take part in "
                "one batch. `lora-modules.json` lists the same adapters in vLLM's JSON form of `--lora-modules`.", ""]
    if merged_models:
        doc += ["Merged-only: vLLM's LoRA loader refuses these adapters (modules trained in full with "
                "modules_to_save, DoRA, trained biases, or a rank above 512), so the adapter was merged into "
                "the base and the merged model is served as a model of its own. The champion's serving "
                "metadata names the exact reason.", ""]
        doc += [f"- `{name}`: merged model at `{path}`" for name, path in merged_models.items()]
        if adapters:
            doc += ["", "They are not in `serve-vllm.sh`'s server; the script's last comments give the command "
                    "for each, on its own port."]
        elif len(merged_models) > 1:
            doc += ["", f"`serve-vllm.sh` starts one server per merged model, on ports {_FIRST_PORT} onwards in "
                    "this order."]
        doc += [""]
    if any("://" in path for path in [adapter.path for adapter in adapters] + list(merged_models.values())):
        doc += ["Some paths above are remote: vLLM loads a local folder or a Hugging Face repo id, so copy "
                "those folders to the serving machine and change the paths in `serve-vllm.sh`.", ""]
    example = adapters[0].name if adapters else next(iter(merged_models))
    doc += ["Start the server with `bash serve-vllm.sh`, then ask it through the OpenAI-compatible endpoint:", "",
            "```bash",
            f"curl http://localhost:{_FIRST_PORT}/v1/completions -H 'Content-Type: application/json' \\",
            f"  -d '{{\"model\": \"{example}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'",
            "```", ""]
    return "\n".join(doc)
