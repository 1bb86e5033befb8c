"""Pipeline vs the reference QLoRA recipe, on the same tiny base, data and hyper-parameters.

Runs `../shared/bench/reference_recipe.py` and
`lora-pipeline run configs/bench/recipe-parity.yaml --select +trained_adapter --set base_model=DIR
--set dataset.source=FILE` alternately (each in a fresh store and Dagster instance, so nothing is
cached), and prints each run's wall time and final train loss plus the pipeline/recipe ratios.
Machines here are shared and noisy: compare within one invocation, quote ratios.

usage: python bench/recipe_parity.py [--rounds 1] [--no-quant] [--out bench/results/parity.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _runs import DATA, RunFailed, build_tiny_base, run_pipeline, run_recipe

COMPARED = ("wall_s", "train_loss", "tokens_per_s", "peak_rss_mb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternating recipe/pipeline pairs")
    parser.add_argument("--no-quant", action="store_true", help="compare plain LoRA instead of QLoRA")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: the shared folder must sit beside the checkout")
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        work = Path(tmp)
        runs: dict[str, list[dict]] = {"recipe": [], "pipeline": []}
        try:
            base = build_tiny_base(work)
            for round_index in range(args.rounds):
                for name, fn in (("recipe", run_recipe), ("pipeline", run_pipeline)):
                    result = fn(base, work / f"{name}-{round_index}", args.no_quant)
                    runs[name].append(result)
                    print(f"round {round_index + 1} {name:<8} wall {result['wall_s']:6.1f}s  loss {result['train_loss']:.4f}"
                          f"  {result['tokens_per_s']:7.0f} tokens/s  peak {result['peak_rss_mb']:6.0f} MB", flush=True)
        except RunFailed as failure:
            sys.exit(f"failed: {failure}")
    median = {name: {k: statistics.median(r[k] for r in results) for k in COMPARED} for name, results in runs.items()}
    ratios = {
        "wall_time_pipeline_over_recipe": median["pipeline"]["wall_s"] / median["recipe"]["wall_s"],
        "train_loss_pipeline_over_recipe": median["pipeline"]["train_loss"] / median["recipe"]["train_loss"],
        "peak_memory_pipeline_over_recipe": median["pipeline"]["peak_rss_mb"] / median["recipe"]["peak_rss_mb"],
    }
    print(json.dumps({"variant": "LoRA" if args.no_quant else "QLoRA", "median": median, "ratios": ratios}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": runs, "median": median, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
