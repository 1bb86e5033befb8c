"""GPU check of the distributed training entry point: torchrun -m lora_pipeline.torchrun.worker on CUDA.

What runs: the micro built-in base quantized to NF4 with quantization.quant_storage bfloat16 (what FSDP
needs), the sample data formatted, then the same spec trained_adapter writes, trained by `torchrun
--standalone --nproc-per-node N -m lora_pipeline.torchrun.worker SPEC` (N = 1 on one H200). Rank 0 opens
Dagster Pipes, which outside a Dagster step is a no-op, so no Dagster instance is needed. Prints one JSON
line (and writes $OUT/torchrun_check.json when $OUT is set): world size, distributed type, the stored
quant dtype read back from the saved base, steps, loss, tokens/s, peak memory; exit 1 when a check fails.

On the device machine (after bench/gpu/run.sh's install, or with its wheels on PYTHONPATH):
    python bench/gpu/torchrun_check.py
Rehearse here on the CPU (world size 2 with gloo; uint8 storage, since FSDP is CUDA-only):
    .venv/bin/python bench/gpu/torchrun_check.py --cpu --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="ranks (each needs its own GPU on CUDA)")
    parser.add_argument("--cpu", action="store_true", help="rehearse on the CPU (gloo, uint8 quant storage)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.base.precision import DeviceInfo, detect_device
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.base.tiny import BUILTIN_MODELS, build_tiny_llama
    from lora_pipeline.ml.data.clean import clean_rows, tokenizer_corpus
    from lora_pipeline.ml.data.formatted import FormatSettings, format_dataset
    from lora_pipeline.ml.data.raw import load_dataset
    from lora_pipeline.ml.training import step_options
    from lora_pipeline.ml.training.distributed import Launch, torchrun_command
    from lora_pipeline.torchrun.worker import training_spec, write_spec
    from lora_pipeline.config.schema import DatasetSettings

    device = DeviceInfo("cpu") if args.cpu else detect_device()
    if not args.cpu and device.device != "cuda":
        print("no CUDA device: use --cpu to rehearse", file=sys.stderr)
        return 2
    storage_dtype = "uint8" if args.cpu else "bfloat16"
    compute = "float32" if args.cpu else "bfloat16"
    work = Path(tempfile.mkdtemp(prefix="torchrun-check-"))
    dataset = DatasetSettings(source=str(REPO / "lora_pipeline" / "data" / "sample_instructions.json"), max_rows=400)
    cleaned = clean_rows(load_dataset(dataset), "normalized")
    base = build_tiny_llama(tokenizer_corpus(cleaned, 0.1), work / "base", BUILTIN_MODELS["micro-llama"])
    quantize_base(base, work / "nf4", "nf4", True, compute, device, quant_storage=storage_dtype)
    stored = json.loads((work / "nf4" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_storage"]

    from transformers import AutoTokenizer

    formatted = format_dataset(cleaned, AutoTokenizer.from_pretrained(work / "nf4"), FormatSettings(max_length=256))
    formatted.train.to_pandas().to_parquet(work / "train.parquet")
    training = TrainingSettings(max_steps=args.steps, batch_size=8, max_length=256, logging_steps=2,
                                checkpoint_every=0, warmup=0.0)
    launch = Launch("ddp" if args.nproc > 1 else "none", args.nproc)
    spec = training_spec(work / "nf4", work / "train.parquet", work / "adapter", LoraSettings(r=8, alpha=16), training,
                         device, step_options(training, device), base_model_name="builtin:micro-llama")
    spec_file = write_spec(work, spec, launch, live_logs=False)
    started = time.perf_counter()
    command = torchrun_command(launch, "lora_pipeline.torchrun.worker", [str(spec_file)])
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    record = {"check": "torchrun_entry_point", "device": device.device, "nproc": args.nproc, "rc": done.returncode,
              "wall_seconds": round(time.perf_counter() - started, 1), "quant_storage": stored}
    if done.returncode == 0:
        result = json.loads((work / "result.json").read_text())
        record.update({key: result[key] for key in ("world_size", "distributed_type", "steps", "train_loss",
                                                     "tokens_per_second", "peak_memory_bytes", "precision")})
        record["adapter_saved"] = (work / "adapter" / "adapter_model.safetensors").is_file()
    else:
        record["stderr_tail"] = done.stderr[-3000:]
    wanted_storage = "uint8" if args.cpu else "bfloat16"
    record["passed"] = bool(done.returncode == 0 and record.get("world_size") == args.nproc and record.get("adapter_saved")
                            and record.get("steps") == args.steps and str(stored).endswith(wanted_storage))
    line = json.dumps(record)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "torchrun_check.json").write_text(line + "\n")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
