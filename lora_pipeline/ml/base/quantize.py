"""Loading a base model in its configured quantization and saving it for reuse. Dagster-free."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.errors import ModelError
from lora_pipeline.ml.base.precision import DeviceInfo, device_map_for, torch_dtype


def quant_storage_name(requested: str, compute_dtype: str, strategy: str) -> str:
    """Resolve quantization.quant_storage: under FSDP the packed weights must share the compute dtype (FSDP
    flattens parameters of one dtype); elsewhere uint8, bitsandbytes' own default."""
    if requested != "auto":
        return requested
    return compute_dtype if strategy == "fsdp" else "uint8"


def bitsandbytes_config(mode: str, double_quant: bool, compute_dtype: str, quant_storage: str = "uint8"):
    """transformers' BitsAndBytesConfig for a quantization mode, or None for 'none'."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=mode,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        bnb_4bit_quant_storage=_storage_dtype(quant_storage),
    )


def _storage_dtype(name: str):
    import torch

    return torch.uint8 if name == "uint8" else torch_dtype(name)


@dataclass(frozen=True)
class QuantizedBase:
    """What quantize_base wrote."""

    parameter_count: int
    load_seconds: float
    quantized_modules: int
    model_type: str


def quantize_base(
    source_dir: Path,
    out_dir: Path,
    mode: str,
    double_quant: bool,
    compute_dtype: str,
    device: DeviceInfo,
    trust_remote_code: bool = False,
    quant_storage: str = "uint8",
) -> QuantizedBase:
    """Load the base model with bitsandbytes quantization and save it (safetensors) with its tokenizer.

    Saving once means training, merging and evaluation reload the quantized weights instead of
    re-quantizing the base each time; the reload is exact.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    quantization = bitsandbytes_config(mode, double_quant, compute_dtype, quant_storage)
    model = AutoModelForCausalLM.from_pretrained(
        source_dir,
        quantization_config=quantization,
        dtype="auto" if quantization is None else torch_dtype(compute_dtype),
        device_map=device_map_for(device),
        trust_remote_code=trust_remote_code,
    )
    load_seconds = time.perf_counter() - started
    if device.device == "cpu" and mode in ("nf4", "fp4"):
        check_cpu_4bit_widths(model)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    quantized = sum(1 for module in model.modules() if type(module).__name__ in ("Linear4bit", "Linear8bitLt"))
    return QuantizedBase(
        parameter_count=_logical_parameter_count(model),
        load_seconds=load_seconds,
        quantized_modules=quantized,
        model_type=model.config.model_type,
    )


CPU_4BIT_BLOCK = 64
CPU_4BIT_OUTPUT_BLOCK = 32  # bitsandbytes' _convert_weight_packed_for_cpu packs output rows in blocks of 32


def check_cpu_4bit_widths(model) -> None:
    """bitsandbytes' CPU 4-bit kernel re-packs weights in blocks of 64 input features and 32 output features;
    other widths crash in training or evaluation (an assertion deep in bitsandbytes), so refuse them up front."""
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        for what, width, block in (("input", module.in_features, CPU_4BIT_BLOCK),
                                   ("output", module.out_features, CPU_4BIT_OUTPUT_BLOCK)):
            if width % block:
                raise ModelError(
                    f"layer {name} has {width} {what} features, not a multiple of {block}, which bitsandbytes' "
                    "CPU 4-bit kernel cannot run; on this CPU use quantization.mode int8 or none"
                )


def _logical_parameter_count(model) -> int:
    """Parameters of the unquantized model (4-bit tensors pack two weights per byte)."""
    total = 0
    for parameter in model.parameters():
        if type(parameter).__name__ == "Params4bit":
            total += parameter.quant_state.shape.numel()
        else:
            total += parameter.numel()
    return total
