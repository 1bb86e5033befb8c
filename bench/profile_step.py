"""Where a training step's time goes: torch profiler over a few steps of the recipe-parity config.

Builds the shared tiny base, quantizes it as configured and trains STEPS optimizer steps under
torch.profiler, then prints the most expensive operators grouped by input shape (the shape tells
which layer an operator belongs to: [tokens, vocab] is the LM head, [1, tokens, hidden] dropout).

usage: python bench/profile_step.py [--steps 12] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "alpaca_en_demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps to profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. quantization.mode=none")
    parser.add_argument("--rows", type=int, default=30, help="operators to list")
    parser.add_argument("--by-operator", action="store_true", help="one row per operator, all shapes together")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from lora_pipeline.config.registry import load_config_file
    from transformers import AutoTokenizer

    from lora_pipeline.assets.data import format_settings
    from lora_pipeline.ml.data.clean import clean_rows
    from lora_pipeline.ml.data.formatted import format_dataset
    from lora_pipeline.ml.data.raw import load_dataset
    from lora_pipeline.ml.base.precision import DeviceInfo, compute_dtype_name
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.training import StepOptions, train_adapter

    with tempfile.TemporaryDirectory(prefix="lora-profile-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(SHARED / "bench" / "make_tiny_base.py"), str(DATA), str(work / "base")],
                       check=True, capture_output=True)
        config = load_config_file(
            REPO / "configs" / "bench" / "recipe-parity.yaml",
            [f"base_model={work / 'base'}", f"dataset.source={DATA}", f"training.max_steps={args.steps}",
             "training.logging_steps=1000", *args.overrides],
        )
        cpu = DeviceInfo(device="cpu")
        q = config.quantization
        quantize_base(work / "base", work / "q", q.mode, q.double_quant, compute_dtype_name(q.compute_dtype, cpu), cpu)
        cleaned = clean_rows(load_dataset(config.dataset), config.dataset.dedupe)
        tokenizer = AutoTokenizer.from_pretrained(work / "base")
        train = format_dataset(cleaned, tokenizer, format_settings(config)).train.to_pandas()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            result = train_adapter(work / "q", train, work / "out", config.lora, config.training, cpu, "profile",
                                   options=StepOptions(dequant_cache=True))  # as the CPU pipeline resolves it
    print(f"{result.steps} steps, {result.tokens_per_second:.0f} tokens/s (profiler overhead included)")
    print(profiler.key_averages(group_by_input_shape=not args.by_operator).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=32, max_shapes_column_width=72))


if __name__ == "__main__":
    main()
