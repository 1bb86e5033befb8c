"""The gguf_export stage: the merged model, the base and the adapter as GGUF files for llama.cpp and Ollama, on demand.

Opt-in: it runs only when asked for (the `export` job, the asset materialized on its own, or `lora-pipeline run
CONFIG --select gguf_export`; a "Materialize all" skips it) and refuses unless export.gguf names a type. The conversion, the read-back check, the
tokenizer check (llama.cpp's tokens for the held-out examples against the model's tokenizer's) and
the Modelfiles are plain functions in ml/export/; this asset resolves the config and the inputs'
folders and persists the files.
"""

from typing import Iterator

import dagster as dg

from lora_pipeline.assets.base import original_weights_dir
from lora_pipeline.assets.common import config_metadata, read_json, ref_metadata, resolve_model_config
from lora_pipeline.assets.data import FORMAT_SUMMARY
from lora_pipeline.assets.evaluation import EVAL_SPLIT
from lora_pipeline.assets.handoff import handoff_asset, not_requested
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.ml.export.gguf import check_quantize, default_cache, export_gguf
from lora_pipeline.ml.export.tokens import adds_special_tokens, held_out_texts
from lora_pipeline.resources.hub import ModelHub
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore


@handoff_asset(kinds={"gguf"})
def gguf_export(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    hub: ModelHub,
    formatted_dataset: ArtifactRef,
    quantized_base: ArtifactRef,
    trained_adapter: ArtifactRef,
    merged_model: ArtifactRef,
) -> Iterator[dg.Output[ArtifactRef]]:
    """The merged model, the base and the adapter as GGUF files (export.gguf: f16, q8_0 or q4_k_m), converted by
    llama.cpp's own scripts, read back and compared with the safetensors weights, tokenized by llama.cpp's own
    tokenizer on the held-out examples exactly as by the model's (else refused, naming the texts), with Ollama
    Modelfiles (FROM the merged model; FROM the base + ADAPTER). On demand only; refuses when export.gguf is unset."""
    if (skipped := not_requested(context)) is not None:
        context.log.info(skipped)
        return
    model_config = resolve_model_config(context, config, registry)
    settings = model_config.export
    if settings.gguf is None:
        raise ConfigError("export.gguf is not set: name a GGUF type (f16 or q8_0) in the model's config "
                          "(export: {gguf: q8_0}) or in the run config")
    check_quantize(settings.gguf, settings.llama_quantize)  # before any conversion starts
    # The template the data was rendered with ('auto' resolved), so Ollama prompts the model the same way.
    template = read_json(storage.local_path(formatted_dataset) / FORMAT_SUMMARY)["template"]
    texts = held_out_texts(storage.local_path(formatted_dataset) / EVAL_SPLIT)
    with storage.writer_lock(context.partition_key, context.asset_key.path[-1], context.run_id):
        with storage.staging_dir() as staging:
            facts = export_gguf(storage.local_path(merged_model), storage.local_path(trained_adapter),
                                lambda: original_weights_dir(storage.local_path(quantized_base), hub,
                                                             model_config.trust_remote_code),
                                staging, settings.gguf, default_cache(), settings.llama_quantize, template,
                                settings.modelfile, progress=context.log.info, texts=texts,
                                add_special_tokens=adds_special_tokens(template))
            ref = storage.publish(staging, context.partition_key, context.asset_key.path[-1])
    yield dg.Output(ref, metadata={**ref_metadata(ref), **config_metadata(model_config), "template": template,
                                   **facts})


# On-demand stages: in the graph after the stage they hand off, outside the tune job (assets/__init__.py).
ON_DEMAND_ASSETS = [gguf_export]
