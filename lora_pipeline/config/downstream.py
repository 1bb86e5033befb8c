"""The config sections of what follows training: merging, evaluation, promotion, retraining,
experiment tracking and publishing (schema.py holds the data and training sections and the whole
ModelConfig)."""

from __future__ import annotations

from typing import Literal, Optional

import pydantic
from pydantic import Field

from lora_pipeline.config.base import DtypeName, StrictSection, names_from_string

# Per-example metrics eval_report can compute; loss is the only one where lower is better.
EVAL_METRICS = ("loss", "token_accuracy", "exact_match", "normalized_match", "rouge_l", "chrf")


class MergeSettings(StrictSection):
    """How the adapter is folded into the base weights."""

    base_weights: Literal["auto", "dequantized", "original"] = Field(
        default="auto",
        description="Weights the adapter is merged into. 'dequantized': the 4-bit weights the adapter "
        "was trained against, dequantized to full precision (the merged model matches the adapter). "
        "'original': the base model's own weights (smaller files' users expect this, but the merged "
        "model drifts from the adapter by the quantization error). 'auto': dequantized for quantized "
        "bases, original otherwise.",
    )
    dtype: DtypeName = Field(
        default="auto",
        description="dtype the merged model is saved in. 'auto': the base model's own dtype.",
    )


class EvalSettings(StrictSection):
    """The held-out evaluation in eval_report."""

    max_examples: int = Field(
        default=200, ge=1, description="Evaluate on at most this many held-out examples."
    )
    batch_size: int = Field(default=8, ge=1, description="Examples per evaluation forward pass.")
    samples: int = Field(
        default=4, ge=0, description="Held-out prompts answered by each model in the report."
    )
    max_new_tokens: int = Field(default=48, ge=1, description="Length limit of each generated answer.")
    metrics: list[str] = Field(
        default=["loss", "token_accuracy", "exact_match", "normalized_match", "rouge_l", "chrf"],
        description="Per-example metrics, stored for every model evaluated (examples.parquet): loss and "
        "token_accuracy from one forward pass; exact_match, normalized_match (case, punctuation and "
        "articles ignored), rouge_l and chrf score each model's greedy answer against the reference.",
    )
    forgetting_probe: bool = Field(
        default=True,
        description="Also measure the loss of base and adapter on a small general-text sample the package "
        "ships, so a fine-tune that damages general ability shows it.",
    )
    @pydantic.field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in EVAL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {list(EVAL_METRICS)}")
        if not value:
            raise ValueError("needs at least one metric")
        return value

    bootstrap_resamples: int = Field(
        default=2000, ge=100, description="Bootstrap resamples behind every 95% interval."
    )
    benchmarks: list[str] = Field(
        default=[],
        description="lm-evaluation-harness tasks run in-process on the base and on the base with the adapter: task "
        "names from benchmark_tasks_dir (task YAML + local data), the shipped smoke test "
        "'lora_pipeline_tiny_mc', or lm-eval's own tasks (gsm8k, mmlu, hellaswag...; these download their "
        "data from the hub). Empty: none.",
    )
    benchmark_tasks_dir: Optional[str] = Field(
        default=None, description="A folder of your own lm-eval task YAML files (lm-eval's include_path)."
    )
    benchmark_limit: Optional[int] = Field(
        default=None, ge=1, description="Run at most this many examples of each benchmark task (all: unset)."
    )
    compare_merge_bases: bool = Field(
        default=True,
        description="For quantized bases, also evaluate a merge into the original weights, so the "
        "report shows what merging into them would cost.",
    )


class PromotionSettings(StrictSection):
    """The gates a candidate passes before the champion stage promotes it (see `lora-pipeline promote --help`)."""

    metric: str = Field(
        default="loss",
        description="The per-example metric the gates and the leaderboard's recommendation compare: loss "
        "(lower is better) or any of eval.metrics (token_accuracy, exact_match, normalized_match, rouge_l, "
        "chrf: higher is better).",
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0.0,
        description="Margin on the metric's own scale: the candidate is better than the base (and a sweep "
        "variant worse than the best) only when the 95% interval of the paired difference clears it.",
    )
    max_regression: float = Field(
        default=0.0,
        ge=0.0,
        description="How much worse than the current champion (same examples) a candidate may be, on the "
        "metric's scale, and still replace it.",
    )
    max_forgetting: float = Field(
        default=0.25,
        ge=0.0,
        description="Largest relative rise of the loss on the general-text probe, adapter vs base "
        "(0.25: 25% higher), before the candidate is refused as having forgotten general ability.",
    )
    max_merge_drift: float = Field(
        default=0.02,
        ge=0.0,
        description="Largest relative difference of held-out loss between the merged model and the "
        "adapter it was merged from.",
    )
    serving: Literal["adapter", "merged", "either"] = Field(
        default="either",
        description="How the champion will be served. 'adapter': it must pass vLLM's LoRA checks (rank, "
        "no modules_to_save, no DoRA, bias none); 'merged' or 'either': an adapter vLLM cannot load is "
        "shipped merged-only.",
    )


class RetrainSettings(StrictSection):
    """When the model is trained again without anyone launching it."""

    schedule: Optional[str] = Field(
        default=None,
        description="Cron expression (e.g. '0 3 * * 1', Mondays 03:00 UTC) of a schedule that re-runs the "
        "pipeline for this model; unset: no schedule. Unchanged assets are skipped.",
    )
    on_data_change: bool = Field(
        default=True,
        description="Re-run the pipeline when the dataset source changes (file content, S3 ETag or hub "
        "revision), noticed by the dataset_changes sensor.",
    )

    @pydantic.field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: Optional[str]) -> Optional[str]:
        from dagster._utils.schedules import is_valid_cron_string

        if value is not None and not is_valid_cron_string(value):
            raise ValueError(f"{value!r} is not a cron expression (five fields, e.g. '0 3 * * 1', or @daily)")
        return value


# The names transformers' Trainer accepts in report_to (its INTEGRATION_TO_CALLBACK); a test keeps them in step.
TRAINER_INTEGRATIONS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
                        "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb")


class TrackingSettings(StrictSection):
    """Experiment tracking: which trackers see each training, and where MLflow records it.

    Tracking records what a stage did; it never changes what a stage makes, so no stage's version
    reads this section (turning a tracker on redoes nothing).
    """

    report_to: list[str] = Field(
        default=[],
        description="Trackers, in the Trainer's report_to spelling: mlflow, tensorboard, wandb, trackio, comet_ml, "
        "... Empty: none, and nothing is contacted. 'mlflow' is the pipeline's own: one MLflow run per trained "
        "adapter with the training curves, the evaluation's metrics, the adapter as a model and registry aliases "
        "(see the other keys). The others go to the Trainer as they are and read their usual variables "
        "(WANDB_PROJECT, TENSORBOARD_LOGGING_DIR, ...).",
    )
    tracking_uri: Optional[str] = Field(
        default=None,
        description="MLflow tracking URI: a server (http://host:5000), a database (postgresql://user@host/db, "
        "sqlite:///path/mlflow.db) or databricks. Unset: $MLFLOW_TRACKING_URI, else the SQLite file mlflow.db in "
        "the Dagster instance folder ($DAGSTER_HOME, .dagster by default).",
    )
    experiment: Optional[str] = Field(
        default=None,
        description="MLflow experiment of the runs. Unset: the model's name (a sweep's name for its variants, so "
        "they are compared side by side).",
    )
    log_model: bool = Field(
        default=True,
        description="Log each adapter as an MLflow transformers model that points at its quantized base by local "
        "path (base_model_path), so mlflow.transformers.load_model needs no hub. Loads the base once more.",
    )
    register_model: bool = Field(
        default=True,
        description="Register each evaluated adapter in the MLflow model registry with the alias 'challenger', "
        "and move the alias 'champion' to it when the champion stage promotes it. Needs log_model.",
    )
    registered_model: Optional[str] = Field(
        default=None,
        description="Name of the registered model. Unset: the model's name (a sweep's name for its variants).",
    )

    @pydantic.field_validator("report_to", mode="before")
    @classmethod
    def _accept_a_single_name(cls, value: object) -> object:
        return names_from_string(value)

    @pydantic.field_validator("report_to")
    @classmethod
    def _known_trackers(cls, value: list[str]) -> list[str]:
        # 'all' would report to whatever happens to be installed, 'none' is spelled [] here.
        unknown = [name for name in value if name not in TRAINER_INTEGRATIONS]
        if unknown:
            raise ValueError(f"unknown tracker(s) {unknown}; known: {list(TRAINER_INTEGRATIONS)} ([] for none)")
        return list(dict.fromkeys(value))

    @pydantic.model_validator(mode="after")
    def _registering_needs_the_model(self) -> "TrackingSettings":
        if self.register_model and not self.log_model and "mlflow" in self.report_to:
            raise ValueError("register_model needs log_model (the registry versions the logged model); "
                             "set register_model: false as well")
        return self

    @property
    def mlflow(self) -> bool:
        """Whether MLflow records this model's runs."""
        return "mlflow" in self.report_to


# A Hub repo id: an optional namespace (user or organization) and a name, as the Hub spells them.
HUB_REPO_ID = r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$"


class PublishSettings(StrictSection):
    """Publishing the champion to the Hugging Face Hub: the on-demand `published_model` stage.

    Nothing is published unless that stage is asked for (the UI, or `lora-pipeline run CONFIG
    --select published_model`); the token comes from $HF_TOKEN, never from here. Like tracking,
    publishing never changes what a stage makes, so no stage's version reads this section.
    """

    repo_id: Optional[str] = Field(
        default=None, pattern=HUB_REPO_ID,
        description="Hub repo to publish to, 'user-or-org/name' (created when missing). Required to publish; "
        "unset: published_model refuses, naming this key.",
    )
    private: bool = Field(
        default=True,
        description="Create the repo private (the Hub ignores this for a repo that exists already: its "
        "visibility is left as it is).",
    )
    revision: str = Field(
        default="main", min_length=1,
        description="Branch to commit to; a branch other than main is created from main when missing.",
    )
    include_merged: bool = Field(
        default=False,
        description="Also upload the champion's merged model (full weights, in the repo's merged/ folder). Off: "
        "the adapter and its card only, a few MB.",
    )
    commit_message: Optional[str] = Field(
        default=None,
        description="Message of the Hub commit. Unset: 'lora-pipeline: champion VERSION of MODEL'.",
    )


# GGUF types export.gguf accepts: the first two the converters write, q4_k_m through llama-quantize.
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")


class ExportSettings(StrictSection):
    """Exporting to GGUF for llama.cpp and Ollama: the opt-in `gguf_export` stage.

    Off by default. The conversion runs llama.cpp's own converter scripts, taken from the pinned
    llama-cpp-python source distribution (nothing is built). Like publishing, exporting never
    changes what the training stages make, so no other stage's version reads this section.
    """

    gguf: Optional[str] = Field(
        default=None,
        description="GGUF type of the exported merged model and adapter: 'f16' (lossless up to fp16 rounding), "
        "'q8_0' (8-bit blocks, about half the size), or 'q4_k_m' (the f16 file quantized by llama.cpp's own "
        "llama-quantize, built once into the user's cache, or the one llama_quantize names). Unset: no GGUF export.",
    )
    llama_quantize: Optional[str] = Field(
        default=None,
        description="Path of a llama.cpp `llama-quantize` binary to use for q4_k_m instead of the one built from "
        "the pinned llama.cpp sources. Unset: the built one.",
    )
    modelfile: bool = Field(
        default=True,
        description="Also write Ollama Modelfiles next to the GGUF files: one FROM the merged model, one FROM the "
        "base with the adapter as ADAPTER, each with the chat template as TEMPLATE.",
    )

    # Dagster's config types cannot spell Optional[Literal[...]]: the choice is checked here.
    @pydantic.field_validator("gguf")
    @classmethod
    def _known_type(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {value!r}; known: {list(GGUF_TYPES)} (unset: no export)")
        return value
