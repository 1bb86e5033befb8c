"""The per-model config: one strict schema for the YAML files, the CLI and the Dagster Launchpad.

This module holds the whole ModelConfig and the sections that make a model (dataset, LoRA,
quantization, training); downstream.py the sections of what follows training.

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

from lora_pipeline.config.base import DtypeName, StrictSection, names_from_string
from lora_pipeline.config.distributed import DistributedSettings
from lora_pipeline.config.mixture import DataFormat, DataSource, MixedSource, mixed_sources
from lora_pipeline.config.downstream import (
    EvalSettings,
    ExportSettings,
    MergeSettings,
    PromotionSettings,
    PublishSettings,
    RetrainSettings,
    TrackingSettings,
)
from lora_pipeline.config.preference import OBJECTIVES, PREFERENCE_OBJECTIVES, PreferenceSettings
from lora_pipeline.ml.base.tiny import BUILTIN_PREFIX

QuantizationMode = Literal["nf4", "fp4", "int8", "none"]
# Dataset keys that only a mixture (dataset.sources) reads.
ONE_SOURCE_UNUSED = ("sources", "mix_seed")


class DatasetSettings(StrictSection):
    """Where the training data comes from, what shape its rows have, how they are templated, cleaned and split."""

    source: Optional[str] = Field(
        default=None,
        description="The data: a local JSON, JSONL, CSV, Parquet or TXT file, a folder or glob of them "
        "(relative paths are resolved against the working directory), a folder written by datasets' "
        "save_to_disk, any fsspec URL (s3://bucket/train.jsonl, s3://bucket/prefix/), or a Hugging "
        "Face hub dataset as 'hf:owner/name' (a bare 'owner/name' that is not a local path works too). "
        "Give this or dataset.sources, not both.",
    )
    sources: Optional[list[DataSource]] = Field(
        default=None,
        description="Instead of dataset.source: several datasets mixed into one training set. Each entry has its "
        "own source and, when it differs from the dataset-level key, its own format, columns, split, subset, "
        "revision, system_prompt and max_rows, plus a name and a weight (or train_rows) saying how much of it "
        "is trained on. Each source is read, checked, cleaned and split on its own (raw rows of a source whose "
        "data and read settings are unchanged are reused, not read again), then its training rows are sampled "
        "or repeated by its weight; the formatted splits are one table with a 'source' column, and the "
        "metadata shows each source's rows and tokens before and after mixing.",
    )
    mix_seed: int = Field(
        default=0,
        description="With dataset.sources: the seed of the draw that samples and repeats the sources' training "
        "rows (and orders the mixed training split). The same seed, config and data give the same mixture.",
    )
    format: DataFormat = Field(
        default="auto",
        description="Row format. 'auto' detects it from the columns and records which. 'alpaca': "
        "instruction, input (optional), output, system (optional). 'sharegpt': conversations = "
        "[{from, value}] with from human/gpt/system/function_call/observation/tool. 'messages': "
        "OpenAI-style [{role, content}], content a string or a list of text and reasoning parts. "
        "'prompt_completion': prompt, completion. 'text': text (a TXT file gives one row per line). "
        "For preference tuning (training.objective dpo, kto, orpo): 'preference': chosen and rejected (text, a "
        "message or a conversation each), the prompt in 'prompt', in ShareGPT 'conversations', or the two "
        "conversations' shared start; 'kto': unpaired prompt, completion, label (true: desirable).",
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
    turns: Literal["auto", "conversation", "per_turn"] = Field(
        default="auto",
        description="How a conversation with several learned turns is trained. 'conversation': one sequence, "
        "every learned turn in it; right when the template renders history as it renders the last turn "
        "(ChatML, Llama 3). 'per_turn': one example per learned turn, the history before it rendered as "
        "the template renders history; what inference sees with templates that render the last answer "
        "differently (Qwen3 and DeepSeek-R1 style thinking templates drop earlier reasoning). 'auto': "
        "one sequence where the template allows it, per turn for the rows where it does not. The "
        "formatted_dataset metadata says how many rows were split and what it cost in tokens.",
    )
    reasoning: Literal["auto", "inline", "drop"] = Field(
        default="auto",
        description="Reasoning in the data (a 'reasoning' content part, a reasoning_content / reasoning / "
        "thinking message field, or a <think>...</think> block opening an answer) is learned with its answer. "
        "'auto': handed to templates that render reasoning_content (Qwen3's), written inline as a "
        "<think>...</think> block before the answer for those that do not. 'inline': always inline. "
        "'drop': left out.",
    )
    unrenderable: Literal["refuse", "drop"] = Field(
        default="refuse",
        description="A row the chat template cannot render (a role it refuses, as Gemma 3 refuses tool "
        "turns; tool calls it leaves out): 'refuse' stops with the row, the reason and the fix; 'drop' "
        "leaves such rows out and counts them, up to dataset.max_unrenderable_rate.",
    )
    max_unrenderable_rate: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="With dataset.unrenderable: drop, the largest share of rows that may be dropped; above "
        "it formatting stops, naming the first dropped row and why.",
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
        description="Use at most this many rows of the source (the first ones), e.g. for a smoke test; with "
        "dataset.sources, of each source that sets no max_rows of its own.",
    )
    follow_symlinks: bool = Field(
        default=False,
        description="Read files that symlinks in a local source lead to outside the source's folder (its "
        "folder, a glob's folder, or a file's folder). Off: such a link is refused, naming it, so a link to a "
        "file elsewhere (/etc/passwd) is never read as rows. Links that stay inside the folder are followed.",
    )

    @pydantic.model_validator(mode="after")
    def _one_source_or_a_mixture(self) -> "DatasetSettings":
        if self.source is None and self.sources is None:
            raise ValueError("missing key 'dataset.source' (one dataset), or give dataset.sources (several, mixed)")
        if self.source is not None and self.sources is not None:
            raise ValueError("give dataset.source (one dataset) or dataset.sources (several, mixed), not both")
        if self.sources is not None:
            if not self.sources:
                raise ValueError("dataset.sources is empty: list at least one source, or give dataset.source")
            mixed_sources(self)  # distinct names
        return self

    @property
    def mixture(self) -> list[MixedSource]:
        """dataset.sources, each with the dataset-level defaults filled in (empty for a one-source dataset)."""
        return mixed_sources(self)

    @property
    def source_label(self) -> str:
        """The data in words, for logs, cards and errors: the source, or the mixture's sources joined by ' + '."""
        return self.source if self.source is not None else " + ".join(entry.source for entry in self.sources or [])


class LoraSettings(StrictSection):
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
        return names_from_string(value)

    @pydantic.field_validator("target_modules")
    @classmethod
    def _auto_stands_alone(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one module name, or 'auto'")
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' cannot be combined with explicit module names")
        return value


class QuantizationSettings(StrictSection):
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
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="4-bit only: the dtype the packed 4-bit weights are stored in (bitsandbytes' "
        "bnb_4bit_quant_storage). FSDP shards parameters of one dtype, so under FSDP it must equal the compute "
        "dtype. 'auto': the compute dtype when training.distributed.strategy is fsdp, uint8 otherwise.",
    )


class TrainingSettings(StrictSection):
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
    eval_steps: int = Field(
        default=0,
        ge=0,
        description="Every N optimizer steps (and at the last), score the held-out split (formatted_dataset's eval "
        "split, its first eval.max_examples scorable examples, as eval_report scores them) with the adapter being "
        "trained: the per-example mean loss, eval_report's 'loss', drawn on the training loss curve and logged to "
        "the trackers as eval_loss. 0: no evaluation while training.",
    )
    early_stopping_patience: int = Field(
        default=0,
        ge=0,
        description="With eval_steps: stop training once the held-out loss has not improved on its best by more "
        "than early_stopping_threshold for this many evaluations in a row. 0: train every step.",
    )
    early_stopping_threshold: float = Field(
        default=0.0,
        ge=0.0,
        description="With early_stopping_patience: the least decrease of the held-out loss that counts as an "
        "improvement.",
    )
    keep_best: bool = Field(
        default=False,
        description="With eval_steps: publish the adapter as it was at the evaluation with the lowest held-out "
        "loss, not at the last step (its weights are kept in memory, and in each checkpoint for a resume).",
    )
    seed: int = Field(default=0, description="Seed for adapter initialisation, dropout and data order.")
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        default="sft",
        description="What the adapter learns. 'sft': the responses (TRL's SFT loss). Preference tuning, on "
        "preference rows (dataset.format preference or kto), with the preference section: 'dpo' (TRL's "
        "DPOTrainer), 'kto' (KTOTrainer; pairs are split into a desirable and an undesirable example), 'orpo' "
        "(trl.experimental.orpo's ORPOTrainer: no reference model, experimental in the pinned TRL 1.16). "
        "Preference tuning wants a far smaller learning_rate than SFT (5e-6 to 5e-5 on real models).",
    )
    init_adapter: Optional[str] = Field(
        default=None,
        description="Start from another model's current champion adapter (its model key, e.g. an SFT model) "
        "instead of a new LoRA: its LoRA settings and base are used, and with preference.reference auto it is "
        "the reference. The base must be that model's (base_model, quantization). A new champion there makes "
        "this model's adapter stale, and the lineage records which champion it started from.",
    )
    distributed: DistributedSettings = Field(
        default=DistributedSettings(),
        description="Several processes (GPUs, machines) training together through torchrun.",
    )

    @pydantic.model_validator(mode="after")
    def _evaluation_before_its_uses(self) -> "TrainingSettings":
        for key, value in (("early_stopping_patience", self.early_stopping_patience), ("keep_best", self.keep_best)):
            if value and not self.eval_steps:
                raise ValueError(f"training.{key} acts on the evaluations while training: set training.eval_steps "
                                 "(e.g. 20) too")
        if self.eval_steps and self.objective != "sft":
            raise ValueError(f"training.eval_steps: evaluation while training is SFT's only so far ({self.objective} "
                             "runs are scored on held-out pairs by eval_report); drop training.eval_steps")
        return self


class ModelConfig(StrictSection):
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
    preference: PreferenceSettings = Field(
        default=PreferenceSettings(), description="Preference tuning (training.objective dpo, kto or orpo)."
    )
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
    export: ExportSettings = Field(
        default=ExportSettings(), description="GGUF export for llama.cpp and Ollama; off by default."
    )

    @pydantic.model_validator(mode="after")
    def _promotion_metric_is_evaluated(self) -> "ModelConfig":
        if self.preference_tuning:
            return self  # the gates use the preference accuracy
        if self.promotion.metric not in self.eval.metrics:
            raise ValueError(f"promotion.metric {self.promotion.metric!r} is not one of eval.metrics {self.eval.metrics}")
        return self

    @pydantic.model_validator(mode="after")
    def _starting_adapter_fits_the_objective(self) -> "ModelConfig":
        training = self.training
        if training.init_adapter is not None and not self.preference_tuning:
            raise ValueError("training.init_adapter starts preference tuning from another model's champion; set "
                             f"training.objective to one of {', '.join(PREFERENCE_OBJECTIVES)}")
        if self.preference.reference == "init_adapter" and training.init_adapter is None:
            raise ValueError("preference.reference is 'init_adapter' but training.init_adapter is not set")
        if self.preference.reference == "base" and training.init_adapter is not None:
            raise ValueError("preference.reference 'base' with training.init_adapter: TRL keeps the starting adapter as "
                             "the reference when it trains one; drop training.init_adapter to compare with the base")
        if self.preference_tuning and self.builtin_base and training.init_adapter is None:
            raise ValueError(f"a built-in base's tokenizer is trained on SFT data, so {training.objective} on "
                             f"{self.base_model} must start from an SFT model trained on it: set training.init_adapter "
                             "to that model's key (configs/tiny-dpo.yaml starts from tiny-demo)")
        if self.preference_tuning and training.packing:
            raise ValueError(f"training.packing does not apply to {training.objective}: pairs are not packed")
        several = training.distributed
        if self.preference_tuning and (several.strategy in ("ddp", "fsdp") or several.nnodes > 1
                                       or several.nproc_per_node not in ("auto", "1")):
            raise ValueError(f"training.distributed: {training.objective} trains in one process (the Dagster step); "
                             "several processes are SFT's only so far: drop training.distributed")
        return self

    @pydantic.model_validator(mode="after")
    def _mixtures_are_sft(self) -> "ModelConfig":
        if self.preference_tuning and self.dataset.sources is not None:
            raise ValueError(f"dataset.sources: {self.training.objective} trains on one dataset of preference rows; "
                             "give it as dataset.source (mixtures are SFT's only so far)")
        return self

    @property
    def preference_tuning(self) -> bool:
        """Whether the objective is a preference one (dpo, kto, orpo) rather than SFT."""
        return self.training.objective in PREFERENCE_OBJECTIVES

    @property
    def builtin_base(self) -> bool:
        """Whether the base is a built-in model (built locally, its tokenizer trained on the data)."""
        return self.base_model.startswith(BUILTIN_PREFIX)

    def canonical_hash(self) -> str:
        """sha256 of the config as canonical JSON: equal configs hash equally, whatever the YAML layout."""
        data = self.model_dump(mode="json")
        if self.dataset.sources is None:  # a one-source config hashes as it did before mixtures existed
            for key in ONE_SOURCE_UNUSED:
                data["dataset"].pop(key)
        payload = json.dumps(data, sort_keys=True, separators=(",", ":"))
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
    preference: Optional[PreferenceSettings] = Field(
        default=None, description="Preference tuning (training.objective dpo, kto or orpo)."
    )
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
    export: Optional[ExportSettings] = Field(
        default=None, description="GGUF export for llama.cpp and Ollama; off by default."
    )

    def sections_given(self) -> dict:
        """The sections this run sets explicitly, as plain data."""
        return {name: value for name, value in self.model_dump(mode="json").items() if value is not None}


# Dagster shows these docstrings as descriptions, some as Markdown: without the source's indentation.
for _config_class in (DatasetSettings, LoraSettings, QuantizationSettings, TrainingSettings, DistributedSettings,
                      PreferenceSettings, MergeSettings, EvalSettings, PromotionSettings, RetrainSettings,
                      TrackingSettings, PublishSettings, ExportSettings, ModelConfig, TuningRunConfig):
    _config_class.__doc__ = inspect.cleandoc(_config_class.__doc__ or "")
