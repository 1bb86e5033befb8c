"""The per-model config: one strict schema for the YAML files, the CLI and the Dagster Launchpad.

This module holds the whole ModelConfig and the LoRA and quantization sections; dataset.py (with mixture.py)
and training.py the other sections that make a model, downstream.py the sections of what follows training.

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
from lora_pipeline.config.dataset import ONE_SOURCE_UNUSED, DatasetSettings
from lora_pipeline.config.training import TrainingSettings
from lora_pipeline.config.downstream import (
    EvalSettings,
    ExportSettings,
    MergeSettings,
    PromotionSettings,
    PublishSettings,
    RetrainSettings,
    TrackingSettings,
)
from lora_pipeline.config.preference import PREFERENCE_OBJECTIVES, PreferenceSettings
from lora_pipeline.ml.base.tiny import BUILTIN_PREFIX

QuantizationMode = Literal["nf4", "fp4", "int8", "none"]
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
