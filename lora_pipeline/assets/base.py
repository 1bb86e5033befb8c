"""The base model, loaded in its configured quantization and saved for every later stage."""

import shutil
from pathlib import Path

import dagster as dg

from lora_pipeline.assets.common import (
    BASE_MODEL_FIELDS,
    Reads,
    pipeline_asset,
    stage_lineage,
    publish_stage,
    read_json,
    resolve_model_config,
    stage_output,
    write_json,
)
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.ml.data.clean import clean_rows, tokenizer_corpus
from lora_pipeline.assets.mixture_data import MIXING_ONLY
from lora_pipeline.assets.starting import StartingAdapter, copy_starting_base, model_source_version, starting_adapter
from lora_pipeline.ml.data.raw import load_dataset
from lora_pipeline.ml.base.precision import compute_dtype_name
from lora_pipeline.ml.base.quantize import quant_storage_name, quantize_base
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

BASE_INFO = "base_info.json"
ORIGINAL_SUBDIR = "original"


@pipeline_asset(
    kinds={"pytorch", "safetensors"}, group="model", uses_gpu=True, code_version="1",
    # A built-in model's tokenizer is trained on the cleaned training split.
    # A built-in base's tokenizer learns from every source's rows, not from how much of each is trained on.
    reads=Reads(config=(*BASE_MODEL_FIELDS, "quantization"), source=lambda config: config.builtin_base,
                with_source=("dataset",), ignoring=MIXING_ONLY),
)
def quantized_base(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    compute: Compute,
) -> dg.Output[ArtifactRef]:
    """The base model loaded with bitsandbytes quantization (NF4/FP4/int8, or none) and saved, so retraining does not re-quantize."""
    model_config = resolve_model_config(context, config, registry)
    start = starting_adapter(storage, model_config, context.partition_key)
    if start is not None:
        return _starting_base(context, model_config, storage, start)
    device = compute.info()
    source_dir = hub.resolve(
        model_config.base_model,
        model_config.base_revision,
        lambda: _builtin_corpus(model_config),
        allow_pickle=model_config.allow_pickle,
        trust_remote_code=model_config.trust_remote_code,
    )
    settings = model_config.quantization
    built_in = model_config.builtin_base
    compute_dtype = compute_dtype_name(settings.compute_dtype, device)
    quant_storage = quant_storage_name(settings.quant_storage, compute_dtype, model_config.training.distributed.strategy)
    with storage.staging_dir() as staging:
        result = quantize_base(
            source_dir, staging, settings.mode, settings.double_quant, compute_dtype, device,
            trust_remote_code=model_config.trust_remote_code, quant_storage=quant_storage,
        )
        if built_in and settings.mode != "none":
            # Built-in models exist nowhere else; keep the originals for merging into them.
            shutil.copytree(source_dir, staging / ORIGINAL_SUBDIR)
        write_json(
            staging / BASE_INFO,
            {
                "base_model": model_config.base_model,
                "revision": model_config.base_revision,
                "source_dtype": _source_dtype(source_dir),
                "quantization": settings.mode,
                "double_quant": settings.double_quant,
                "compute_dtype": compute_dtype,
                "quant_storage": quant_storage,
                "model_type": result.model_type,
            },
        )
        record = stage_lineage(context, model_config, storage, {}, device=device,
                            source_version=model_source_version(model_config, storage) if built_in else "",
                            parameters=result.parameter_count, compute=compute.choices(model_config))
        ref = publish_stage(context, storage, staging, record)
    context.log.info(f"quantized {result.quantized_modules} linear layers to {settings.mode} in {result.load_seconds:.1f}s")
    return stage_output(
        ref, record, model_config,
        {
            "base_revision": model_config.base_revision or "default",
            "quantization": settings.mode,
            "double_quant": settings.double_quant,
            "compute_dtype": compute_dtype,
            "quant_storage": quant_storage,
            "device": device.device,
            "parameters": result.parameter_count,
            "quantized_layers": result.quantized_modules,
            "load_seconds": round(result.load_seconds, 3),
        },
    )


def _starting_base(context: dg.AssetExecutionContext, model_config: ModelConfig, storage: ArtifactStore,
                   start: StartingAdapter) -> dg.Output[ArtifactRef]:
    """The base the starting adapter (training.init_adapter) was trained on, copied: an adapter means something only
    on its own base, and a built-in base rebuilt from this model's data would have another tokenizer."""
    with storage.staging_dir() as staging:
        info = copy_starting_base(start, storage, model_config, staging)
        record = stage_lineage(context, model_config, storage, {}, source_version=model_source_version(model_config, storage),
                               copied_from=start.quantized_base.uri, init_adapter=start.as_entry())
        ref = publish_stage(context, storage, staging, record)
    context.log.info(f"the base of the {start.describe()}, copied from {start.quantized_base.uri}")
    return stage_output(ref, record, model_config, {
        "base_revision": model_config.base_revision or "default", "quantization": info["quantization"],
        "double_quant": info["double_quant"], "compute_dtype": info["compute_dtype"],
        "quant_storage": info.get("quant_storage", "uint8"), "copied_from": start.quantized_base.uri,
        "init_adapter": start.describe(),
    })


def original_weights_dir(quantized_dir: Path, hub: ModelHub, trust_remote_code: bool = False) -> Path:
    """Where the unquantized weights of a quantized base are: kept beside it for built-in models, else the hub."""
    info = read_json(quantized_dir / BASE_INFO)
    if info["quantization"] == "none":
        return quantized_dir
    if (quantized_dir / ORIGINAL_SUBDIR).is_dir():
        return quantized_dir / ORIGINAL_SUBDIR
    return hub.resolve(info["base_model"], info["revision"], lambda: [], trust_remote_code=trust_remote_code)


def source_dtype(quantized_dir: Path) -> str:
    """The dtype the base model was published in (what 'auto' merges save as)."""
    return read_json(quantized_dir / BASE_INFO)["source_dtype"]


def _builtin_corpus(model_config: ModelConfig) -> list[str]:
    # The same corpus formatted_dataset gives the built-in tokenizer, so both resolve one model.
    dataset = model_config.dataset
    if dataset.sources:
        from lora_pipeline.ml.data.mixture import CleanedMixture

        return CleanedMixture.read(dataset.mixture, dataset.dedupe).corpus(dataset.eval_fraction)
    cleaned = clean_rows(load_dataset(dataset), dataset.dedupe)
    return tokenizer_corpus(cleaned, dataset.eval_fraction)


def _source_dtype(model_dir: Path) -> str:
    config = read_json(model_dir / "config.json")
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"
