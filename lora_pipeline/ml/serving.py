"""Whether vLLM can serve an adapter as a LoRA adapter, and the files that serve the champions. Dagster-free.

vLLM serves LoRA matrices on a shared base (`--enable-lora --lora-modules NAME=PATH`); it does not
load modules trained in full (modules_to_save), DoRA magnitudes or trained biases, and its
`--max-lora-rank` takes one of a few values. An adapter it cannot load is shipped merged-only.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Servability:
    """Whether vLLM can serve the adapter as an adapter, its rank, and why not."""

    servable: bool
    rank: int
    reasons: tuple[str, ...]

    @property
    def mode(self) -> str:
        """'adapter' when servable as one, else 'merged-only'."""
        return "adapter" if self.servable else "merged-only"

    def as_dict(self) -> dict:
        """Plain data."""
        return {"servable": self.servable, "mode": self.mode, "rank": self.rank, "reasons": list(self.reasons)}


def servability(adapter_config: dict) -> Servability:
    """Check a PEFT adapter_config.json against what vLLM's LoRA serving accepts."""
    rank = max([int(adapter_config.get("r", 0)), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    reasons = []
    saved = adapter_config.get("modules_to_save") or []
    if saved:
        reasons.append(f"modules_to_save {sorted(saved)} are trained in full: vLLM serves LoRA matrices only, so this "
                       "adapter can only be served merged")
    if adapter_config.get("use_dora"):
        reasons.append("DoRA (use_dora) adapters are not supported by vLLM's LoRA serving")
    if adapter_config.get("bias", "none") != "none":
        reasons.append(f"bias {adapter_config.get('bias')!r}: vLLM loads LoRA adapters without trained biases")
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        reasons.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    return Servability(not reasons, rank, tuple(reasons))


def read_servability(adapter_dir: Path) -> Servability:
    """servability() of a saved adapter folder."""
    return servability(json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8")))


def max_lora_rank_for(ranks: list[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits every rank."""
    needed = max(ranks)
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= needed:
            return allowed
    raise ValueError(f"rank {needed} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter to serve: its name in requests, its folder, its rank."""

    name: str
    path: str
    rank: int


def serving_files(base_model: str, adapters: list[ServedAdapter], merged_models: dict[str, str] | None = None) -> dict[str, str]:
    """serve-vllm.sh, lora-modules.json and SERVING.md for the champions on one base."""
    names = [adapter.name for adapter in adapters] + list(merged_models or {})
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(f"served model name {name!r}: use letters, digits, '.', '_' and '-'")
    if len(set(names)) != len(names):
        raise ValueError(f"served model names repeat: {names}")
    lines = ["#!/usr/bin/env bash", "# Written by lora-pipeline with the champion: serves it with vLLM's OpenAI-compatible server.",
             "set -euo pipefail"]
    if adapters:
        modules = " ".join(shlex.quote(f"{a.name}={a.path}") for a in adapters)
        lines.append(f"exec vllm serve {shlex.quote(base_model)} --enable-lora --lora-modules {modules} "
                     f"--max-lora-rank {max_lora_rank_for([a.rank for a in adapters])} --max-loras {len(adapters)} \"$@\"")
    for name, path in (merged_models or {}).items():
        lines.append(f"# {name} is merged-only (vLLM cannot load it as an adapter): serve the merged model")
        lines.append(f"vllm serve {shlex.quote(path)} --served-model-name {shlex.quote(name)} \"$@\"")
    modules_json = [{"name": a.name, "path": a.path, "base_model_name": base_model} for a in adapters]
    example = names[0] if names else "MODEL"
    doc = ["# Serving", "", f"Base model: `{base_model}`.", ""]
    doc += [f"- `{a.name}`: LoRA adapter (rank {a.rank}) at `{a.path}`" for a in adapters]
    doc += [f"- `{name}`: merged-only, the merged model at `{path}`" for name, path in (merged_models or {}).items()]
    doc += ["", "Start the server with `bash serve-vllm.sh`, then:", "", "```",
            "curl http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\",
            f"  -d '{{\"model\": \"{example}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'", "```", ""]
    return {"serve-vllm.sh": "\n".join(lines) + "\n", "lora-modules.json": json.dumps(modules_json, indent=2) + "\n",
            "SERVING.md": "\n".join(doc)}
