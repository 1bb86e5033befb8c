"""What published_model uploads to a Hub repo: the champion's adapter, its card, maybe the merged model. Dagster-free.

The repo's root is a PEFT adapter folder (`AutoPeftModelForCausalLM.from_pretrained(repo)` loads
it) with the champion's model card as README.md. The merged model goes in a subfolder: at the
root, transformers would find adapter_config.json beside its config.json and load the adapter
onto the base instead of the merged weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MERGED_FOLDER = "merged"
CARD_FILE = "README.md"
# What the artifact store keeps about an artifact, not part of the model: its manifest, card
# history, inputs, and the lineage (local paths and run ids; the card carries a summary of it).
STORE_FILES = frozenset({"MANIFEST.json", "CARD.json", "INPUTS.json", "LINEAGE.json"})


def default_commit_message(owner: str, version: str) -> str:
    """The commit message when publish.commit_message is unset."""
    return f"lora-pipeline: champion {version} of {owner}"


def assemble_upload(out_dir: Path, adapter_dir: Path, card: str, merged_dir: Path | None = None) -> list[str]:
    """Lay out the repo's files in out_dir (empty): the adapter's files at the root, `card` as README.md (it
    replaces the adapter's own card), the merged model's files under merged/. Returns the repo paths, sorted.

    Files are hard-linked from the store where it can (a merged model is gigabytes), else copied.
    """
    _place_folder(adapter_dir, out_dir, skip=STORE_FILES | {CARD_FILE})
    (out_dir / CARD_FILE).write_text(card, encoding="utf-8")
    if merged_dir is not None:
        _place_folder(merged_dir, out_dir / MERGED_FOLDER, skip=STORE_FILES)
    return sorted(path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file())


def _place_folder(source: Path, target: Path, skip: frozenset[str]) -> None:
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or relative.as_posix() in skip:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:  # another file system (a remote store's cache), or links not supported
            shutil.copyfile(path, destination)
