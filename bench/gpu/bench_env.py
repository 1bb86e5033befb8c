"""How the GPU bench reaches the project without its Dagster layer, and what it records about the machine.

The project's ML code (lora_pipeline/ml/...) is Dagster-free, but its config schema subclasses dagster's
Config (a frozen pydantic model). The GPU machine has no Dagster; run.sh installs a slim Dagster from the
carried wheels when they fit, and where `import dagster` still fails, the schema is loaded on a stand-in
Config with the same pydantic settings (frozen, arbitrary types), so the YAML is validated by the project's
own classes either way. Which of the two ran is recorded in the environment record.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# training.* keys another change adds to TrainingSettings; the bench sets them only where the schema has them.
OPTIONAL_TRAINING_FIELDS = ("attention", "padding_free", "liger_kernel", "dequant_cache")
DISTRIBUTIONS = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel",
                 "triton", "pydantic", "dagster", "pyarrow", "pandas", "numpy", "huggingface-hub", "tokenizers",
                 "typing-extensions", "flash-attn")


def enter_repo() -> None:
    """Import lora_pipeline from this checkout (it is not installed on the GPU machine) and run from its root."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.chdir(REPO)


def config_schema_base() -> str:
    """Make lora_pipeline.config importable: real Dagster if it imports, else the stand-in; return which."""
    try:
        import dagster

        dagster.Config  # noqa: B018 - dagster loads its API lazily: touch what the schema subclasses
        return f"dagster {importlib.metadata.version('dagster')}"
    except Exception as error:  # a missing or half-installed Dagster: anything it raises means "not usable"
        reason = f"{type(error).__name__}: {error}"
    for name in [name for name in sys.modules if name == "dagster" or name.startswith("dagster.")]:
        del sys.modules[name]
    sys.modules["dagster"] = _dagster_stand_in()
    return f"stand-in for dagster.Config ({reason[:120]})"


def _dagster_stand_in() -> types.ModuleType:
    import functools

    import pydantic

    class Config(pydantic.BaseModel):
        """dagster.Config's pydantic settings, which are all the schema relies on."""

        model_config = pydantic.ConfigDict(frozen=True, arbitrary_types_allowed=True,
                                           ignored_types=(functools.cached_property,))

    module = types.ModuleType("dagster")
    module.Config = Config
    return module


def transformers_compat() -> list[str]:
    """Bridge what the project's trainer asks of transformers 5.24 where an older transformers is installed.

    The trainer passes SFTConfig(activation_checkpointing=...), the name transformers gave gradient_checkpointing
    after 5.17 (the GPU machine's version). There, the argument is handed on under its old name; what it does
    is the same. Returns a note per bridge applied (recorded with the results), none on a current transformers.
    """
    import dataclasses

    import transformers
    import trl

    if "activation_checkpointing" in {field.name for field in dataclasses.fields(transformers.TrainingArguments)}:
        return []
    global SFTConfigWithActivationCheckpointing

    def __init__(self, *args, activation_checkpointing=None, **kwargs):
        if activation_checkpointing is not None:
            kwargs.setdefault("gradient_checkpointing", activation_checkpointing)
        super(SFTConfigWithActivationCheckpointing, self).__init__(*args, **kwargs)

    # A module-level name, so the trainer's arguments pickle (datasets fingerprints them) and unpickle by reference.
    SFTConfigWithActivationCheckpointing = type("SFTConfigWithActivationCheckpointing", (trl.SFTConfig,),
                                                {"__init__": __init__, "__module__": __name__})
    trl.SFTConfig = SFTConfigWithActivationCheckpointing  # the trainer imports it from trl for its arguments
    return [f"transformers {transformers.__version__}: SFTConfig(activation_checkpointing=) passed on as "
            "gradient_checkpointing"]


def training_fields() -> set[str]:
    """The fields the project's TrainingSettings has in this checkout."""
    from lora_pipeline.config.schema import TrainingSettings

    return set(TrainingSettings.model_fields)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides the schema knows, optional training.* overrides it lacks): the latter are dropped, not errors."""
    known, missing, fields = [], [], training_fields()
    for override in overrides:
        key = override.split("=", 1)[0]
        section, _, name = key.partition(".")
        if section == "training" and name in OPTIONAL_TRAINING_FIELDS and name not in fields:
            missing.append(override)
        else:
            known.append(override)
    return known, missing


def load_config(path: Path, overrides: list[str]):
    """The project's ModelConfig for a YAML file with overrides, the schema's missing optional keys left out."""
    from lora_pipeline.config.registry import load_config_file

    known, missing = split_overrides(overrides)
    return load_config_file(Path(path), known), missing


def versions() -> dict[str, str | None]:
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name.replace("-", "_")] = None
    return found


def importable(module: str) -> str:
    """'ok' or the error importing it gives (a package can be installed and still fail, e.g. without its CUDA lib)."""
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:160]}"


def attention_backends() -> dict:
    """Which fused attention kernels this torch offers: SDPA's backends, varlen Flash, the flash_attn package."""
    import torch

    backends = {"flash_attn_package": importlib.util.find_spec("flash_attn") is not None}
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 - torch >= 2.10

        backends["torch_varlen_attn"] = True
    except ImportError:
        backends["torch_varlen_attn"] = False
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled"):
        probe = getattr(torch.backends.cuda, name, None)
        backends[name.removesuffix("_enabled")] = bool(probe()) if probe else None
    return backends


def bf16_matmul_tflops(size: int = 8192, repeats: int = 10) -> float | None:
    """A large bf16 matrix product's rate on this GPU (random data): the practical ceiling beside the datasheet's."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / seconds / 1e12


def nf4_round_trip_error() -> float | str:
    """bitsandbytes' NF4 quantize/dequantize on the GPU (its CUDA library loaded): relative error, ~0.1 when sound."""
    try:
        import bitsandbytes.functional as bnb_functional
        import torch

        weight = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
        restored = bnb_functional.dequantize_4bit(packed, state).float()
        return float((restored - weight.float()).norm() / weight.float().norm())
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:200]}"


def environment_record() -> dict:
    """Versions, device, attention kernels, the config schema's optional fields and how the schema was loaded."""
    import torch

    record = {"part": "environment", "status": "ok", "python": platform.python_version(),
              "executable": sys.executable, "versions": versions(), "torch_cuda": torch.version.cuda,
              "schema_base": config_schema_base()}
    fields = training_fields()
    record["optional_training_fields"] = {name: name in fields for name in OPTIONAL_TRAINING_FIELDS}
    for module in ("bitsandbytes", "trl", "datasets", "liger_kernel.transformers"):
        record[f"import_{module.split('.')[0]}"] = importable(module)
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record.update(device_name=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                      compute_capability=f"{properties.major}.{properties.minor}",
                      attention=attention_backends(), bf16_matmul_tflops=bf16_matmul_tflops(),
                      nf4_round_trip_error=nf4_round_trip_error())
    else:
        record.update(device_name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                      attention=attention_backends())
    return record
