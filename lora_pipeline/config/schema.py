"""The per-model config: one strict schema for the YAML files, the CLI and the Dagster Launchpad.

Every class here is a Dagster ``Config`` (a frozen pydantic model), so the same fields, defaults,
ranges and descriptions are what the YAML loader validates, what ``--set`` overrides and what the
Launchpad shows. Unknown keys are rejected everywhere.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Literal, Optional

import dagster as dg
import pydantic
from pydantic import Field

from lora_pipeline.ml.base.tiny import BUILTIN_PREFIX

# Per-example metrics eval_report can compute; loss is the only one where lower is better.
EVAL_METRICS = ("loss", "token_accuracy", "exact_match", "normalized_match", "rouge_l", "chrf")
QuantizationMode = Literal["nf4", "fp4", "int8", "none"]
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


class _Strict(dg.Config):
    model_config = pydantic.ConfigDict(extra="forbid")


class DatasetSettings(_Strict):
    """Where the training data comes from, what shape its rows have, how they are templated, cleaned and split."""

    source: str = Field(
        description="The data: a local JSON, JSONL, CSV, Parquet or TXT file, a folder or glob of them "
        "(relative paths are resolved against the working directory), a folder written by datasets' "
        "save_to_disk, any fsspec URL (s3://bucket/train.jsonl, s3://bucket/prefix/), or a Hugging "
        "Face hub dataset as 'hf:owner/name' (a bare 'owner/name' that is not a local path works too)."
    )
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = Field(
        default="auto",
        description="Row format. 'auto' detects it from the columns and records which. 'alpaca': "
        "instruction, input (optional), output, system (optional). 'sharegpt': conversations = "
        "[{from, value}] with from human/gpt/system/function_call/observation/tool. 'messages': "
        "OpenAI-style [{role, content}], content a string or a list of text parts. "
        "'prompt_completion': prompt, completion. 'text': text (a TXT file gives one row per line).",
    )
    columns: dict[str, str] = Field(
        default={},
        description="Column mapping for data whose columns have other names: the format's column "
        "name to the data's, e.g. {instruction: question, output: answer}.",
    )
    split: str = Field(
        default="train", description="Split to read from a hub dataset or a save_to_disk DatasetDict."
    )
    subset: Optional[str] = Field(
        default=None, description="Hub dataset configuration (subset) name, if it has several."
    )
    revision: Optional[str] = Field(
        default=None, description="Hub dataset revision (branch, tag or commit) to read."
    )
    template: str = Field(
        default="auto",
        description="How rows become text. 'auto': the alpaca template for alpaca rows, plain "
        "concatenation for prompt_completion and text, and for conversations the tokenizer's own "
        "chat template, or ChatML when it has none. Named: 'alpaca', 'chatml', 'tokenizer', 'plain'. "
        "Anything containing '{{' or '{%' is used as an inline Jinja chat template.",
    )
    system_prompt: Optional[str] = Field(
        default=None,
        description="System prompt added to every example that has none of its own.",
    )
    turn_flag_field: Optional[str] = Field(
        default=None,
        description="The message field that says whether a conversation turn is learned (1 or true) or only "
        "context (0 or false), as other tools write it. By default the first of 'loss_weight', 'train' and "
        "'weight' a message carries; turns without one follow the usual rule (every assistant turn is "
        "learned). Applies while training.completion_only_loss is on.",
    )
    dedupe: Literal["normalized", "exact", "none"] = Field(
        default="normalized",
        description="Duplicate removal: 'normalized' drops exact duplicates and rows equal up to case "
        "and whitespace; 'exact' only identical rows; 'none' keeps them (they still never straddle "
        "the train/eval split).",
    )
    overlong: Literal["auto", "truncate", "drop", "split"] = Field(
        default="auto",
        description="Examples longer than training.max_length tokens (counted with the real tokenizer): "
        "'truncate' keeps their first max_length tokens, 'drop' removes them, 'split' cuts them into "
        "max_length blocks (each led by BOS where the tokenizer uses one, EOS only at the document's "
        "end), so nothing is lost: the continued-pretraining way. 'auto': split for the text format, "
        "truncate for the others. An example left with no response tokens is removed, and every "
        "count is recorded.",
    )
    max_truncation_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of examples that may exceed training.max_length; above it the "
        "formatted_dataset check fails and training does not start (raise max_length or clean the data).",
    )
    eval_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation. Rows are assigned by a hash of their "
        "normalised content, so the split is stable across runs and duplicates never straddle it.",
    )
    max_rows: Optional[int] = Field(
        default=None,
        ge=1,
        description="Use at most this many rows of the source (the first ones), e.g. for a smoke test.",
    )


class LoraSettings(_Strict):
    """The LoRA adapter: PEFT's LoraConfig surface."""

    r: int = Field(default=16, ge=1, description="Rank of the low-rank update matrices.")
    alpha: float = Field(
        default=32.0, gt=0.0, description="Scaling numerator: the update is scaled by alpha / r."
    )
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Dropout applied to the LoRA input during training."
    )
    target_modules: list[str] = Field(
        default=["auto"],
        description="Module names to adapt. 'auto' selects every linear projection of the "
        "architecture (Llama/Mistral/Qwen/Gemma: q,k,v,o,gate,up,down; GPT-2: c_attn,c_proj,c_fc; "
        "Falcon: query_key_value,dense,dense_h_to_4h,dense_4h_to_h; Phi-3: qkv_proj,o_proj,"
        "gate_up_proj,down_proj).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which bias terms are trained along with the adapter."
    )
    modules_to_save: list[str] = Field(
        default=[],
        description="Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens).",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."
    )
    use_dora: bool = Field(
        default=False,
        description="DoRA: learn each adapted weight's magnitude apart from its direction (PEFT's use_dora). "
        "Often better than plain LoRA at low ranks, slower to train, and not servable as an adapter by vLLM "
        "(serve the merged model).",
    )

    @pydantic.field_validator("target_modules", "modules_to_save", mode="before")
    @classmethod
    def _accept_a_single_name(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @pydantic.field_validator("target_modules")
    @classmethod
    def _auto_stands_alone(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one module name, or 'auto'")
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' cannot be combined with explicit module names")
        return value


class QuantizationSettings(_Strict):
    """How the base model's weights are stored while the adapter trains (bitsandbytes)."""

    mode: QuantizationMode = Field(
        default="nf4",
        description="nf4 or fp4: 4-bit QLoRA; int8: LLM.int8(); none: plain LoRA on full-precision weights.",
    )
    double_quant: bool = Field(
        default=True,
        description="4-bit only: also quantize the quantization constants (about 0.4 bits/param saved).",
    )
    compute_dtype: DtypeName = Field(
        default="auto",
        description="dtype the 4-bit layers compute in. 'auto': bfloat16 on GPUs that support it, "
        "float16 on older GPUs, float32 on CPU (bf16 matmuls are slow on most CPUs).",
    )


class TrainingSettings(_Strict):
    """Trainer hyper-parameters (TRL SFTTrainer)."""

    epochs: float = Field(default=1.0, gt=0.0, description="Passes over the training split.")
    max_steps: Optional[int] = Field(
        default=None, ge=1, description="Stop after this many optimizer steps; overrides epochs."
    )
    batch_size: int = Field(default=4, ge=1, description="Sequences per device per forward pass.")
    grad_accumulation: int = Field(
        default=1, ge=1, description="Forward passes accumulated into one optimizer step."
    )
    learning_rate: float = Field(default=2e-4, gt=0.0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"
    ] = Field(default="cosine", description="Learning-rate schedule after warm-up.")
    warmup: float = Field(
        default=0.03,
        ge=0.0,
        description="Warm-up length: a fraction of all steps when below 1, a step count otherwise.",
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0.0, description="Gradient clipping norm.")
    max_length: int = Field(
        default=512, ge=8, description="Longest training sequence in tokens; longer ones are truncated."
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into each max_length sequence (faster on short data).",
    )
    completion_only_loss: bool = Field(
        default=True,
        description="Compute the loss on the response tokens only: the output of single-turn rows, "
        "every assistant turn (with its end-of-turn marker) of conversations. Off: on every token.",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Recompute activations in the backward pass to save memory. 'auto': on for "
        "GPUs, off on CPU, where memory is rarely the limit and recomputing costs about 30% speed.",
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adafactor", "sgd"
    ] = Field(
        default="adamw_torch",
        description="Optimizer. paged_* keep their states in paged memory (bitsandbytes) to absorb spikes.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Mixed precision for the trainable path. 'auto': bf16 on GPUs that support it, "
        "fp16 on older GPUs, fp32 on CPU.",
    )
    padding_free: bool = Field(
        default=True,
        description="When not packing, run each batch as one row of its examples back to back, without padding "
        "(attention stays within each example). Off: pad every example to the batch's longest, as most trainers do; "
        "on alpaca-like data that is 30-40% padding.",
    )
    attention: Literal["auto", "dense"] = Field(
        default="auto",
        description="Attention in training. 'auto': each packed or padding-free example attends only to itself, "
        "computed per example (varlen Flash attention on CUDA where torch has it). 'dense': the model's own "
        "implementation over the whole row with a block-diagonal mask (same result, ~4x the score work when packing).",
    )
    dequant_cache: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="QLoRA: dequantize the frozen 4-bit weights once and train against that copy instead of "
        "dequantizing them in every forward and backward pass (bit-identical, faster, holds the weights in the "
        "compute dtype). 'auto': on CPU when the memory plan leaves room for it, off on GPUs.",
    )
    liger_kernel: bool = Field(
        default=False,
        description="Use Liger's Triton kernels for the model's layers (RMSNorm, RoPE, SwiGLU) on CUDA; needs the "
        "liger-kernel package.",
    )
    logging_steps: int = Field(default=5, ge=1, description="Log loss and throughput every N steps.")
    checkpoint_every: int = Field(
        default=100,
        ge=0,
        description="Save a resumable checkpoint (adapter, optimizer, scheduler, RNG, step) to the store "
        "every N optimizer steps; a killed run relaunched with the same config and data resumes from "
        "the newest one. 0: no checkpoints.",
    )
    seed: int = Field(default=0, description="Seed for adapter initialisation, dropout and data order.")


class MergeSettings(_Strict):
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


class EvalSettings(_Strict):
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


class PromotionSettings(_Strict):
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


class RetrainSettings(_Strict):
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


class TrackingSettings(_Strict):
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
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

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


class PublishSettings(_Strict):
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


class ModelConfig(_Strict):
    """One model to fine-tune: a YAML file under configs/ is one of these, and one partition."""

    base_model: str = Field(
        description="Base model: a Hugging Face hub id, a local model folder, or "
        "'builtin:tiny-llama' (a small random Llama built locally, no network)."
    )
    base_revision: Optional[str] = Field(
        default=None, description="Hub revision (branch, tag or commit) of the base model."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow a base model that only has pickle weights (.bin, .pt, .pth). Off: such a "
        "model is refused (unpickling can run code); only safetensors weights are loaded.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the base model or its tokenizer (an auto_map in its "
        "config). Off: such a model is refused before anything is loaded, and no .py file is downloaded.",
    )
    dataset: DatasetSettings = Field(description="The training data.")
    lora: LoraSettings = Field(default=LoraSettings(), description="The LoRA adapter.")
    quantization: QuantizationSettings = Field(
        default=QuantizationSettings(), description="Quantization of the base model."
    )
    training: TrainingSettings = Field(default=TrainingSettings(), description="Training.")
    merge: MergeSettings = Field(default=MergeSettings(), description="Merging.")
    eval: EvalSettings = Field(default=EvalSettings(), description="Evaluation.")
    promotion: PromotionSettings = Field(default=PromotionSettings(), description="Promotion gates.")
    retrain: RetrainSettings = Field(default=RetrainSettings(), description="Scheduled and data-triggered retraining.")
    tracking: TrackingSettings = Field(
        default=TrackingSettings(), description="Experiment tracking (MLflow, TensorBoard, W&B, ...); off by default."
    )
    publish: PublishSettings = Field(
        default=PublishSettings(), description="Publishing the champion to the Hugging Face Hub (on demand)."
    )

    @pydantic.model_validator(mode="after")
    def _promotion_metric_is_evaluated(self) -> "ModelConfig":
        if self.promotion.metric not in self.eval.metrics:
            raise ValueError(f"promotion.metric {self.promotion.metric!r} is not one of eval.metrics {self.eval.metrics}")
        return self

    @property
    def builtin_base(self) -> bool:
        """Whether the base is a built-in model (built locally, its tokenizer trained on the data)."""
        return self.base_model.startswith(BUILTIN_PREFIX)

    def canonical_hash(self) -> str:
        """sha256 of the config as canonical JSON: equal configs hash equally, whatever the YAML layout."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


class TuningRunConfig(dg.Config):
    """Run config of every pipeline asset: the model config, section by section.

    A section left empty comes from the partition's YAML file, so materializing a partition from
    the UI without any config uses that file as it is. A section given here replaces the file's.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    base_model: Optional[str] = Field(default=None, description=ModelConfig.model_fields["base_model"].description)
    base_revision: Optional[str] = Field(
        default=None, description=ModelConfig.model_fields["base_revision"].description
    )
    allow_pickle: Optional[bool] = Field(
        default=None, description=ModelConfig.model_fields["allow_pickle"].description
    )
    trust_remote_code: Optional[bool] = Field(
        default=None, description=ModelConfig.model_fields["trust_remote_code"].description
    )
    dataset: Optional[DatasetSettings] = Field(default=None, description="The training data.")
    lora: Optional[LoraSettings] = Field(default=None, description="The LoRA adapter.")
    quantization: Optional[QuantizationSettings] = Field(
        default=None, description="Quantization of the base model."
    )
    training: Optional[TrainingSettings] = Field(default=None, description="Training.")
    merge: Optional[MergeSettings] = Field(default=None, description="Merging.")
    eval: Optional[EvalSettings] = Field(default=None, description="Evaluation.")
    promotion: Optional[PromotionSettings] = Field(default=None, description="Promotion gates.")
    retrain: Optional[RetrainSettings] = Field(default=None, description="Scheduled and data-triggered retraining.")
    tracking: Optional[TrackingSettings] = Field(
        default=None, description="Experiment tracking (MLflow, TensorBoard, W&B, ...); off by default."
    )
    publish: Optional[PublishSettings] = Field(
        default=None, description="Publishing the champion to the Hugging Face Hub (on demand)."
    )

    def sections_given(self) -> dict:
        """The sections this run sets explicitly, as plain data."""
        return {name: value for name, value in self.model_dump(mode="json").items() if value is not None}


# Dagster shows these docstrings as descriptions, some as Markdown: without the source's indentation.
for _config_class in (DatasetSettings, LoraSettings, QuantizationSettings, TrainingSettings, MergeSettings,
                      EvalSettings, PromotionSettings, RetrainSettings, TrackingSettings, PublishSettings, ModelConfig,
                      TuningRunConfig):
    _config_class.__doc__ = inspect.cleandoc(_config_class.__doc__ or "")
