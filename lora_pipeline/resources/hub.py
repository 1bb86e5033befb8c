"""Where base models come from: the built-in tiny model, a local folder, or the Hugging Face hub."""

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Callable

import dagster as dg
from pydantic import Field

from lora_pipeline.errors import ModelError, ModelRefused
from lora_pipeline.ml.base.tiny import BUILTIN_PREFIX, BUILTIN_REVISION, build_tiny_llama, builtin_shape
from lora_pipeline.ml.base.tokenizer import load_tokenizer

CorpusFn = Callable[[], list[str]]

# Only what a causal LM needs to load; pickled weights only when the config allows them.
TOKENIZER_FILE_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
HUB_FILE_PATTERNS = [*TOKENIZER_FILE_PATTERNS, "*.safetensors"]
PICKLE_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
REMOTE_CODE_PATTERNS = ["*.py"]
# Under cache_dir: which tokenizer class AutoTokenizer chose for which files (ml/base/tokenizer.py).
TOKENIZER_CHOICES = "tokenizer-classes"
# Files whose auto_map names Python classes that transformers would import from the model's folder.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_pickle_only(folder: Path, name: str) -> None:
    """Refuse a model folder whose weights exist only as pickles (loading them can run arbitrary code)."""
    has_safetensors = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and "tokenizer" not in p.name)
    if pickles and not has_safetensors:
        raise ModelRefused(
            f"base_model {name!r}: only pickle weights ({', '.join(pickles[:3])}); unpickling can run code, so "
            "they are refused. Convert them to safetensors, or set allow_pickle: true if you trust the source"
        )


def refuse_remote_code(folder: Path, name: str) -> None:
    """Refuse a model folder that asks transformers to import its own Python code (an auto_map)."""
    for file_name in CODE_MAP_FILES:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
        except (ValueError, AttributeError):
            continue  # not this check's business; loading reports a broken file
        if auto_map:
            classes = auto_map.values() if isinstance(auto_map, dict) else auto_map
            shown = ", ".join(sorted({str(c if isinstance(c, str) else c[0]) for c in classes})[:3])
            raise ModelRefused(
                f"base_model {name!r}: {file_name} has an auto_map ({shown}), so loading it runs Python code "
                "shipped with the model. Set trust_remote_code: true if you trust the source"
            )


class ModelHub(dg.ConfigurableResource):
    """Resolves a config's base_model to a local model folder: built-in, local path or hub id."""

    cache_dir: str = Field(
        default=".cache/lora_pipeline/models",
        description="Folder where built-in models are built and cached.",
    )

    def tokenizer(self, base_model: str, revision: str | None, corpus: CorpusFn, trust_remote_code: bool = False):
        """The base model's tokenizer, loaded (a hub download fetches the tokenizer's files, not the weights).

        The class AutoTokenizer chooses for a folder is remembered in cache_dir, so later loads skip
        reading the model's config, which imports torch (see ml/base/tokenizer.py).
        """
        folder = self.resolve(base_model, revision, corpus, tokenizer_only=True, trust_remote_code=trust_remote_code)
        return load_tokenizer(folder, Path(self.cache_dir) / TOKENIZER_CHOICES, trust_remote_code)

    def resolve(
        self,
        base_model: str,
        revision: str | None,
        corpus: CorpusFn,
        tokenizer_only: bool = False,
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
    ) -> Path:
        """A local folder holding config.json, safetensors weights and the tokenizer.

        corpus is called only for built-in models, whose tokenizer is trained on it. With
        tokenizer_only, a hub download skips the weights (the data stages need only the tokenizer).
        Models with only pickle weights are refused unless allow_pickle, and models that ship their
        own code unless trust_remote_code (then their .py files are downloaded too).
        """
        if base_model.startswith(BUILTIN_PREFIX):
            return self._build_builtin(base_model, corpus())
        local = Path(base_model).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise ModelError(f"base_model {base_model!r}: the folder has no config.json")
            folder = local.resolve()
        else:
            folder = self._download(base_model, revision, tokenizer_only, allow_pickle, trust_remote_code)
        if not trust_remote_code:
            refuse_remote_code(folder, base_model)
        if not tokenizer_only and not allow_pickle:
            refuse_pickle_only(folder, base_model)
        if not tokenizer_only and not any(folder.glob("*.safetensors")) and not any(
            p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()
        ):
            raise ModelError(
                f"base_model {base_model!r}: no safetensors weights in {folder} (a hub repo with only pickle "
                "weights is downloaded without them; set allow_pickle: true if you trust the source)"
            )
        return folder

    def _build_builtin(self, base_model: str, corpus: list[str]) -> Path:
        shape = builtin_shape(base_model)
        digest = hashlib.sha256("\x1e".join(corpus).encode()).hexdigest()[:16]
        target = (Path(self.cache_dir).resolve()
                  / f"{base_model.removeprefix(BUILTIN_PREFIX)}-r{BUILTIN_REVISION}-{digest}")
        if not (target / "config.json").exists():
            partial = target.with_name(target.name + f".partial-{uuid.uuid4().hex[:8]}")
            try:
                build_tiny_llama(corpus, partial, shape)
                shutil.rmtree(target, ignore_errors=True)
                partial.rename(target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return target

    def _download(self, repo_id: str, revision: str | None, tokenizer_only: bool = False,
                  allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
        from huggingface_hub import snapshot_download

        patterns = TOKENIZER_FILE_PATTERNS if tokenizer_only else HUB_FILE_PATTERNS
        if allow_pickle and not tokenizer_only:
            patterns = [*patterns, *PICKLE_WEIGHT_PATTERNS]
        if trust_remote_code:
            patterns = [*patterns, *REMOTE_CODE_PATTERNS]
        try:
            return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))
        except Exception as exc:  # the hub client raises many types; all mean "cannot get the model"
            raise ModelError(
                f"base_model {repo_id!r}: not a local folder, and the hub download failed "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
            ) from exc


class LocalModelHub(ModelHub):
    """A hub without network: hub ids map to local folders (tests, air-gapped clusters)."""

    models: dict[str, str] = Field(
        default={}, description="Hub id -> local model folder that stands in for it."
    )

    def _download(self, repo_id: str, revision: str | None, tokenizer_only: bool = False,
                  allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
        if repo_id not in self.models:
            raise ModelError(
                f"base_model {repo_id!r}: not available offline; known: {', '.join(sorted(self.models)) or 'none'}"
            )
        return Path(self.models[repo_id]).resolve()
