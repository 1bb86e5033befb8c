"""What every command shares: the Dagster instance, quiet libraries, the data check, errors and exit codes."""

from __future__ import annotations

from dataclasses import dataclass

import fcntl
import logging
import os
import sys
import warnings
from pathlib import Path

import dagster as dg

from lora_pipeline.assets.common import MODEL_PARTITIONS
from lora_pipeline.config.registry import ConfigRegistry
from lora_pipeline.errors import ConfigError, LoraPipelineError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_REFUSED = 3  # a promotion gate refused the candidate (the assets before it are published)


DEFAULT_INSTANCE_YAML = """\
# Written by lora-pipeline on first use; edit freely.
telemetry:
  enabled: false
nux:
  enabled: false
# quantized_base, trained_adapter, merged_model and eval_report run in the `gpu` pool: at most this many
# at once (the number of GPUs found when this file was written; 1 without a GPU).
concurrency:
  pools:
    default_limit: {gpu_limit}
"""


def quiet_libraries() -> None:
    """Progress bars and warnings of the libraries off: the CLI prints its own progress.

    Without importing transformers or datasets (1.6 s that `list`, `validate` or `rollback` would
    otherwise pay): each takes its setting from what is set here when it is imported, and one that is
    imported already is told directly.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    # On CPUs with AVX512-BF16, bitsandbytes warns that it could not fetch an optional 4-bit kernel
    # from the hub (the `kernels` package); its built-in CPU path, the one tested here, is used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # the hub reads its variable once, at import; transformers copies its setting
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def instance() -> dg.DagsterInstance:
    """The persistent instance at $DAGSTER_HOME (default .dagster/ here), created on first use."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    # Two runs launched at once on a fresh home would both create the instance's SQLite schema.
    with (home / ".lora-pipeline-instance.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "dagster.yaml").exists():
            from lora_pipeline.ml.base.precision import detect_device

            gpu_limit = max(1, detect_device().gpu_count)
            (home / "dagster.yaml").write_text(DEFAULT_INSTANCE_YAML.format(gpu_limit=gpu_limit))
        found = dg.DagsterInstance.get()
        found.get_runs(limit=1)  # creates the run storage's schema while we hold the lock
        return found


def reclaim_dead_runs(instance: dg.DagsterInstance) -> None:
    """Runs of this machine whose process was killed: marked failed, pool slots freed (reclaim.py), said on stderr."""
    from lora_pipeline.reclaim import reclaim_dead_runs as reclaim

    for line in reclaim(instance):
        print(f"note: {line}", file=sys.stderr)


def register_partition(instance: dg.DagsterInstance, key: str, config_path: Path) -> None:
    """Add model `key` as a partition, unless another config file already owns that key."""
    registry = ConfigRegistry()
    if key in registry.keys and registry.path_of(key) != config_path.resolve():
        raise ConfigError(
            f"{config_path}: model key {key!r} is already taken by {registry.path_of(key)}; rename the file"
        )
    if not instance.has_dynamic_partition(MODEL_PARTITIONS.name, key):
        instance.add_dynamic_partitions(MODEL_PARTITIONS.name, [key])


def check_data_early(model_config):
    """Read, check and clean the dataset before any model is loaded; return the cleaned rows and the split sizes."""
    from lora_pipeline.assets.preference.data import require_objective_fits
    from lora_pipeline.ml.data.clean import clean_rows, split_sizes
    from lora_pipeline.ml.data.raw import load_dataset
    from lora_pipeline.ml.preference.formats import PREFERENCE_FORMATS
    from lora_pipeline.ml.preference.formatted import preference_rows

    if model_config.dataset.sources:  # SFT only: each source read, checked and cleaned, named when it fails
        from lora_pipeline.ml.data.mixture import CleanedMixture

        mixture = CleanedMixture.read(model_config.dataset.mixture, model_config.dataset.dedupe)
        return mixture, mixture.split_sizes(model_config.dataset.eval_fraction)
    loaded = load_dataset(model_config.dataset)
    require_objective_fits(model_config, loaded.format, loaded.source)
    if loaded.format in PREFERENCE_FORMATS:  # every row parsed as a pair: a bad one is named now
        return PreferenceRows(loaded, len(preference_rows(loaded.frame, loaded.format, loaded.rows.where,
                                                          model_config.dataset.system_prompt))), (None, None)
    cleaned = clean_rows(loaded, model_config.dataset.dedupe)
    return cleaned, split_sizes(cleaned, model_config.dataset.eval_fraction)


@dataclass
class PreferenceRows:
    """Preference rows read and parsed (their rendering and split need the model's tokenizer: formatted_dataset)."""

    loaded: object
    rows: int

    @property
    def counts(self) -> dict:
        return {"rows_in": self.rows, "empty": 0, "exact_duplicates": 0, "normalized_duplicates": 0}


def user_error_in(exc: BaseException) -> LoraPipelineError | None:
    """The user error behind an exception (Dagster wraps the asset's own), or None for a bug."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LoraPipelineError):
            return current
        current = getattr(current, "user_exception", None) or current.__cause__ or current.__context__
    return None
