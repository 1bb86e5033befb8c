"""What each training-step lever is worth, measured alone: seconds per optimizer step and loss, on the parity job.

Builds the shared tiny base (../shared/bench/make_tiny_base.py), formats the alpaca demo data with the
recipe-parity config (configs/bench/recipe-parity.yaml, QLoRA r16, packing at 256, batch 4 x 2) and
quantizes it once, then trains STEPS optimizer steps per case, each case in a fresh process, the
cases interleaved over ROUNDS so machine noise spreads over all of them:

  none          every lever off: TRL's loss head, dense attention, padded batches, PEFT's dropout
  +lever        that lever alone on top of none
  all           every lever on (dequant cache included)
  all-lever     every lever but that one

Each case prints s/step (median over rounds, the first WARMUP steps excluded), real tokens/s, the
loss after STEPS steps and the pad fraction; the ratios against `none` and `all` tell what a lever
gives alone and what removing it costs.

    python bench/step_levers.py                         # QLoRA, packing (the parity job)
    python bench/step_levers.py --set training.packing=false --set lora.dropout=0.05
    python bench/step_levers.py --set quantization.mode=none --levers lean_loss,shared_dropout
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "alpaca_en_demo.json"
WARMUP = 2
OFF = dict(lean_loss=False, per_document_attention=False, padding_free=False, dequant_cache=False,
           shared_dropout=False, liger_kernel=False)
LEVERS = ("lean_loss", "per_document_attention", "padding_free", "dequant_cache", "shared_dropout")


def prepare(work: Path, overrides: list[str]) -> dict:
    """Base, quantized base and formatted training split on disk; returns the resolved config sections."""
    from transformers import AutoTokenizer

    from lora_pipeline.assets.data import format_settings
    from lora_pipeline.config.registry import load_config_file
    from lora_pipeline.ml.base.precision import DeviceInfo, compute_dtype_name
    from lora_pipeline.ml.base.quantize import quantize_base
    from lora_pipeline.ml.data.clean import clean_rows
    from lora_pipeline.ml.data.formatted import format_dataset
    from lora_pipeline.ml.data.raw import load_dataset

    subprocess.run([sys.executable, str(SHARED / "bench" / "make_tiny_base.py"), str(DATA), str(work / "base")],
                   check=True, capture_output=True)
    config = load_config_file(REPO / "configs" / "bench" / "recipe-parity.yaml",
                              [f"base_model={work / 'base'}", f"dataset.source={DATA}", *overrides])
    cpu = DeviceInfo(device="cpu")
    q = config.quantization
    base = work / "base"
    if q.mode != "none":
        quantize_base(base, work / "q", q.mode, q.double_quant, compute_dtype_name(q.compute_dtype, cpu), cpu)
        base = work / "q"
    cleaned = clean_rows(load_dataset(config.dataset), config.dataset.dedupe)
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    format_dataset(cleaned, tokenizer, format_settings(config)).train.to_pandas().to_parquet(work / "train.parquet")
    return {"base": str(base), "lora": config.lora.model_dump(), "training": config.training.model_dump()}


def run_case(work: Path, prepared: dict, options: dict, steps: int) -> dict:
    """One case in a fresh process (so allocator state and caches do not carry over)."""
    job = {"work": str(work), "prepared": prepared, "options": options, "steps": steps}
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"case {options} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_main(job: dict) -> None:
    import pandas as pd

    from lora_pipeline.config.schema import LoraSettings, TrainingSettings
    from lora_pipeline.ml.base.precision import DeviceInfo
    from lora_pipeline.ml.training import StepOptions, train_adapter

    prepared, work = job["prepared"], Path(job["work"])
    training = TrainingSettings(**{**prepared["training"], "max_steps": job["steps"], "logging_steps": 1,
                                   "checkpoint_every": 0})
    elapsed: list[float] = []  # logged every step: the gaps are step times
    with tempfile.TemporaryDirectory(dir=work) as out:
        result = train_adapter(Path(prepared["base"]), pd.read_parquet(work / "train.parquet"), Path(out),
                               LoraSettings(**prepared["lora"]), training, DeviceInfo(device="cpu"), "bench",
                               progress=lambda report: elapsed.append(report["elapsed_seconds"]),
                               options=StepOptions(**job["options"]))
    step_times = [later - earlier for earlier, later in zip(elapsed, elapsed[1:])]
    timed = step_times[WARMUP:] or step_times
    print(json.dumps({"seconds_per_step": statistics.median(timed), "tokens_per_second": result.tokens_per_second,
                      "loss": result.loss_history[-1][1], "pad_fraction": result.pad_fraction,
                      "dequant_cache_mb": result.dequantized_cache_bytes / 2**20}))


def cases(levers: tuple[str, ...]) -> dict[str, dict]:
    everything = {**OFF, **{lever: True for lever in levers}}
    named = {"none": dict(OFF), "all": everything}
    for lever in levers:
        named[f"+{lever}"] = {**OFF, lever: True}
        named[f"all-{lever}"] = {**everything, lever: False}
    return named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per case (default 14)")
    parser.add_argument("--rounds", type=int, default=1, help="times each case runs, interleaved (default 1)")
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated levers to measure")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override on top of configs/bench/recipe-parity.yaml")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        case_main(json.loads(args.case))
        return
    named = cases(tuple(lever for lever in args.levers.split(",") if lever))
    with tempfile.TemporaryDirectory(prefix="lora-levers-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args.overrides)
        runs: dict[str, list[dict]] = {name: [] for name in named}
        for _ in range(args.rounds):
            for name, options in named.items():
                runs[name].append(run_case(work, prepared, options, args.steps))
                print(f"  {name}: {runs[name][-1]}", file=sys.stderr)
    table = summarize(runs)
    print(render(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"overrides": args.overrides, "steps": args.steps, "cases": table}, indent=2))


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per case the medians over rounds, and its speed against `none` and `all`."""
    table = {}
    for name, results in runs.items():
        table[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
    for row in table.values():
        row["speedup_vs_none"] = table["none"]["seconds_per_step"] / row["seconds_per_step"]
        row["vs_all"] = row["seconds_per_step"] / table["all"]["seconds_per_step"]
    return table


def render(table: dict[str, dict]) -> str:
    lines = [f"{'case':<30}{'s/step':>8}{'tok/s':>8}{'loss':>9}{'pad':>6}{'x none':>8}{'/ all':>7}"]
    for name, row in table.items():
        lines.append(f"{name:<30}{row['seconds_per_step']:>8.3f}{row['tokens_per_second']:>8.0f}{row['loss']:>9.4f}"
                     f"{row['pad_fraction']:>6.2f}{row['speedup_vs_none']:>8.2f}{row['vs_all']:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
