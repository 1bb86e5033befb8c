"""A base's tokenizer, loaded as AutoTokenizer loads it but without reading the model's config each time. Dagster-free.

To choose the tokenizer class, AutoTokenizer reads the model's config, and that imports the model's
config class and with it torch (and torch.distributed): about 3 CPU-seconds, 2.5 s of the 15 s that
formatted_dataset took for 100k rows, in a stage that only tokenizes. The class it chooses depends only on
the folder's config files, the folder's path and the transformers version; so the choice is
remembered under a hash of those, and later loads call that class's from_pretrained directly,
which is the call AutoTokenizer itself makes once it has chosen. Only classes that ship with
transformers are remembered; a tokenizer from the model's own code always goes through AutoTokenizer.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from importlib.metadata import version
from pathlib import Path

from lora_pipeline.hashing import sha256_of_file

# What AutoTokenizer's choice reads: the tokenizer's and the model's configs, tokenizer.json (a
# Llama-declared tokenizer with a byte-level tokenizer.json gets the generic class) and whether a
# Mistral tekken.json exists.
CHOICE_FILES = ("tokenizer_config.json", "config.json", "tokenizer.json", "tekken.json")


def load_tokenizer(folder: Path, memo_dir: Path | None, trust_remote_code: bool = False):
    """The tokenizer of a model folder, as AutoTokenizer.from_pretrained(folder) returns it.

    With memo_dir, the class AutoTokenizer chose for these exact files is looked up there first
    (and recorded there after a first load).
    """
    memo = None if memo_dir is None else memo_dir / f"{_choice_key(folder, trust_remote_code)}.json"
    remembered = _remembered_class(memo)
    if remembered is not None:
        return remembered.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    chosen = type(tokenizer)
    if memo is not None and chosen.__module__.startswith("transformers."):
        _remember(memo, {"module": chosen.__module__, "class": chosen.__qualname__, "folder": str(folder)})
    return tokenizer


def _choice_key(folder: Path, trust_remote_code: bool) -> str:
    digest = hashlib.sha256(f"{version('transformers')}\x1f{folder}\x1f{trust_remote_code}".encode())
    for name in CHOICE_FILES:
        path = folder / name
        digest.update(b"\x1e" + name.encode() + b"\x1f")
        if path.is_file():
            digest.update(sha256_of_file(path).encode())
    return digest.hexdigest()[:32]


def _remembered_class(memo: Path | None):
    if memo is None:
        return None
    try:
        choice = json.loads(memo.read_text())
        return getattr(importlib.import_module(choice["module"]), choice["class"])
    except (AttributeError, OSError, ValueError, KeyError, ImportError):
        return None  # no memo, or one this transformers cannot honour: choose again


def _remember(memo: Path, choice: dict) -> None:
    """Written by rename, so a concurrent load never reads half a memo; a read-only cache just goes unremembered."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f"{memo.name}.{uuid.uuid4().hex[:8]}.partial")
        partial.write_text(json.dumps(choice))
        os.replace(partial, memo)
    except OSError:
        pass
