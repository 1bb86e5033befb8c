"""The pipeline against its peers on the parity job: the reference recipe and LLaMA-Factory 0.9.5.

Builds the tiny base once (../shared/bench/make_tiny_base.py on ../shared/data/alpaca_en_demo.json),
then, for each round, runs every tool on the same base, data and hyper-parameters (QLoRA r16,
packing at 256, batch 4 x 2, 1 epoch; --no-quant for plain LoRA), one after the other, rotating
which goes first:

  pipeline      `lora_pipeline.cli run configs/bench/recipe-parity.yaml --select +trained_adapter`
                in a fresh DAGSTER_HOME and LORA_PIPELINE_STORAGE (raw data -> adapter)
  recipe        ../shared/bench/reference_recipe.py
  lf_shared     `llamafactory-cli train` with ../shared/bench/peers/llamafactory_*_sft.yaml as is
  lf_best       the same with LLaMA-Factory's best CPU settings: bf16: false,
                disable_gradient_checkpointing: true

Each runs under /usr/bin/time -v while its process tree's RSS is sampled: wall s, peak RSS and CPU s
(user + system) are measured from outside, the same way for all. The machines here are shared, so
each run also records the share of the machine's CPU time other processes took meanwhile ("others'
CPU %"); runs above 10% are flagged, since their times are not comparable. train s is each tool's
own trainer runtime, and wall - train s the time spent outside training (imports, data
preparation, model loading, saving).
tokens/s counts real (non-pad) tokens for every tool: the pipeline's and the recipe's packed rows
carry no padding; LLaMA-Factory's effective_tokens_per_sec counts the padding of its packed rows,
so its real tokens are counted with ../shared/bench/peers/llamafactory_count_tokens.py instead.
LLaMA-Factory's loss is over response tokens only and its template adds a system sentence, so
its loss is shown but not compared.

Prints a table (medians over rounds) and the pipeline's ratios against the recipe and against
LLaMA-Factory's best setting (fastest wall, highest tokens/s, lowest peak RSS, each picked on its
own), with targets: wall <= 0.8, tokens/s >= 1.25, peak RSS <= 1, loss within 1% of the recipe's.
Machines here are shared and noisy: quote the ratios of one invocation, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _runs import DATA, REPO, SHARED_BENCH, RunFailed, build_tiny_base, code_state, finish_record, run_measured
from _runs import quiet_medians, require_bench_inputs, run_pipeline, run_recipe

PEERS = SHARED_BENCH / "peers"
DEFAULT_OUT = REPO / "bench" / "results" / "peer_parity.json"
DEFAULT_LF_VENV = REPO.parent / "lf_venv"
LF_SETTINGS = ("lf_shared", "lf_best")
LABELS = {
    "pipeline": "pipeline",
    "recipe": "reference recipe",
    "lf_shared": "LLaMA-Factory (shared YAML)",
    "lf_best": "LLaMA-Factory (best CPU)",
}
FIGURES = ("wall_s", "train_s", "outside_training_s", "tokens_per_s", "peak_rss_mb", "train_loss", "final_logged_loss",
           "cpu_s", "others_cpu_share")
TARGETS = {"wall": 0.8, "tokens_per_s": 1.25, "peak_rss": 1.0, "loss_tolerance": 0.01}


# --- LLaMA-Factory --------------------------------------------------------------------------------

def lf_run_config(template_text: str, base: Path, data_dir: Path, out: Path, best_cpu: bool) -> dict:
    """The shared YAML with its placeholders filled; best_cpu switches to fp32 without checkpointing."""
    filled = template_text.replace("BASE_DIR", str(base)).replace("DATA_DIR", str(data_dir)).replace("OUT_DIR", str(out))
    config = yaml.safe_load(filled)
    if best_cpu:
        # bf16 autocast without bf16 hardware and recomputed activations are what a GPU wants;
        # on a CPU they only cost time (the peers README measured 0.68 s against 1.06 s a step).
        config["bf16"] = False
        config["disable_gradient_checkpointing"] = True
    return config


def lf_env(out: Path) -> dict:
    # Offline, as the peers README runs it, and a datasets cache of its own so no run reuses another's.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "cache")}


def parse_lf_token_counts(stdout: str) -> dict:
    """llamafactory_count_tokens.py's JSON line: packed_rows, padded_tokens, real_tokens, loss_tokens."""
    return {key: int(value) for key, value in json.loads(stdout.strip().splitlines()[-1]).items()}


def parse_lf_results(all_results: dict, trainer_state: dict | None, token_counts: dict) -> dict:
    """Figures from LLaMA-Factory's all_results.json (and trainer_state.json for the last logged loss).

    tokens/s is real tokens over train_runtime, not its effective_tokens_per_sec (which counts padding).
    """
    epochs = float(all_results.get("epoch", 1.0))
    train_s = float(all_results["train_runtime"])
    real_tokens = token_counts["real_tokens"] * epochs
    logged = [entry["loss"] for entry in (trainer_state or {}).get("log_history", []) if "loss" in entry]
    return {
        "train_loss": float(all_results["train_loss"]),
        "final_logged_loss": float(logged[-1]) if logged else None,
        "train_s": train_s,
        "train_tokens": int(real_tokens),
        "tokens_per_s": real_tokens / train_s,
        "lf_effective_tokens_per_s": all_results.get("effective_tokens_per_sec"),
        "token_counts": token_counts,
    }


def lf_yaml_template(no_quant: bool) -> str:
    return (PEERS / ("llamafactory_lora_sft.yaml" if no_quant else "llamafactory_qlora_sft.yaml")).read_text()


def run_llamafactory(lf_venv: Path, base: Path, data_dir: Path, work: Path, no_quant: bool, *, best_cpu: bool,
                     token_cache: dict) -> dict:
    """`llamafactory-cli train` on the shared YAML (best_cpu: with its fastest CPU settings), measured."""
    out = work / "out"
    config = lf_run_config(lf_yaml_template(no_quant), base, data_dir, out, best_cpu)
    run_yaml = work / "run.yaml"
    work.mkdir(parents=True, exist_ok=True)
    run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    env = lf_env(work)
    # Precision and checkpointing do not change the packed dataset, so one count serves both settings.
    if "counts" not in token_cache:
        counted = run_measured([str(lf_venv / "bin" / "python"), str(PEERS / "llamafactory_count_tokens.py"),
                                str(run_yaml)], work / "count_tokens", env)
        token_cache["counts"] = parse_lf_token_counts(counted.stdout)
    measured = run_measured([str(lf_venv / "bin" / "llamafactory-cli"), "train", str(run_yaml)], work / "llamafactory", env)
    state_file = out / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text()) if state_file.exists() else None
    figures = parse_lf_results(json.loads((out / "all_results.json").read_text()), trainer_state, token_cache["counts"])
    figures["settings"] = {"bf16": config.get("bf16"),
                           "gradient_checkpointing": not config.get("disable_gradient_checkpointing", False)}
    return finish_record(measured, figures)


def lf_data_dir(work: Path) -> Path:
    """A folder holding the alpaca file and the peers' dataset_info.json, as LLaMA-Factory's dataset_dir."""
    folder = work / "lf_data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA, folder / DATA.name)
    shutil.copy(PEERS / "dataset_info.json", folder / "dataset_info.json")
    return folder


# --- summary --------------------------------------------------------------------------------------

def summarize(records: dict[str, list[dict]]) -> dict:
    """Medians per tool and the pipeline's ratios against the recipe and LLaMA-Factory's best settings.

    Pure: records maps a tool ("pipeline", "recipe", "lf_shared", "lf_best") to its runs' records;
    runs with an "error" and tools without runs are left out. A tool's runs that shared the machine
    (others' CPU share above CONTENDED_SHARE) are left out of its medians when it has a quiet run:
    a run slowed by someone else's work says nothing about the tool.
    """
    per_tool = quiet_medians(records, FIGURES)
    medians, contended = per_tool.medians, per_tool.contended
    ratios: dict[str, dict] = {}
    pipeline = medians.get("pipeline")
    if pipeline and "recipe" in medians:
        recipe = medians["recipe"]
        ratios["vs_recipe"] = _ratios(pipeline, recipe, recipe, recipe)
        loss_ratio = pipeline["train_loss"] / recipe["train_loss"]
        ratios["vs_recipe"]["train_loss"] = {"ratio": loss_ratio, "target": f"within {TARGETS['loss_tolerance']:.0%}",
                                             "met": abs(loss_ratio - 1) <= TARGETS["loss_tolerance"]}
    peers = {tool: medians[tool] for tool in LF_SETTINGS if tool in medians}
    if pipeline and peers:
        by_wall = min(peers, key=lambda tool: peers[tool]["wall_s"])
        by_speed = max(peers, key=lambda tool: peers[tool]["tokens_per_s"])
        by_memory = min(peers, key=lambda tool: peers[tool]["peak_rss_mb"])
        ratios["vs_llamafactory_best"] = _ratios(pipeline, peers[by_wall], peers[by_speed], peers[by_memory])
        for key, tool in (("wall", by_wall), ("tokens_per_s", by_speed), ("peak_rss", by_memory)):
            ratios["vs_llamafactory_best"][key]["against"] = tool
    return {"medians": medians, "ratios": ratios, "contended_runs": contended}


def _ratios(pipeline: dict, fastest: dict, quickest: dict, leanest: dict) -> dict:
    wall = pipeline["wall_s"] / fastest["wall_s"]
    speed = pipeline["tokens_per_s"] / quickest["tokens_per_s"]
    memory = pipeline["peak_rss_mb"] / leanest["peak_rss_mb"]
    return {
        "wall": {"ratio": wall, "target": f"<= {TARGETS['wall']}", "met": wall <= TARGETS["wall"]},
        "tokens_per_s": {"ratio": speed, "target": f">= {TARGETS['tokens_per_s']}", "met": speed >= TARGETS["tokens_per_s"]},
        "peak_rss": {"ratio": memory, "target": f"<= {TARGETS['peak_rss']}", "met": memory <= TARGETS["peak_rss"]},
    }


def format_table(summary: dict) -> str:
    """The medians as a markdown table, then one line per ratio."""
    def cell(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = ["| tool / setting | runs | wall s | train s | outside training s | real tokens/s | peak RSS MB "
             "| train loss | last logged loss | CPU s | others' CPU % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for tool, m in summary["medians"].items():
        lines.append(f"| {LABELS.get(tool, tool)} | {m['runs']} | {cell(m['wall_s'], 1)} | {cell(m['train_s'], 1)} "
                     f"| {cell(m['outside_training_s'], 1)} | {cell(m['tokens_per_s'])} | {cell(m['peak_rss_mb'])} "
                     f"| {cell(m['train_loss'], 4)} | {cell(m['final_logged_loss'], 4)} | {cell(m['cpu_s'])} "
                     f"| {cell(None if m['others_cpu_share'] is None else 100 * m['others_cpu_share'])} |")
    for peer, ratios in summary["ratios"].items():
        for name, ratio in ratios.items():
            against = f" (against {LABELS[ratio['against']]})" if "against" in ratio else ""
            verdict = "met" if ratio["met"] else "NOT met"
            lines.append(f"pipeline {peer} {name}: {ratio['ratio']:.3f}, target {ratio['target']}: {verdict}{against}")
    for run in summary.get("contended_runs", []):
        lines.append(f"WARNING: the machine was shared during {run}")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------

def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs every tool once (default 1)")
    parser.add_argument("--no-quant", action="store_true", help="plain LoRA instead of QLoRA (NF4, double quant)")
    parser.add_argument("--skip-peer", action="store_true", help="leave LLaMA-Factory out: pipeline and recipe only")
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV,
                        help=f"LLaMA-Factory's own venv, see ../shared/bench/peers/README.md (default {DEFAULT_LF_VENV})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON with every run's figures and the summary "
                        "(default bench/results/peer_parity.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (base, outputs, logs) and print its path")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="run nothing: print the table and ratios of the runs in a JSON this script wrote")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.from_json:
        print(format_table(summarize(json.loads(args.from_json.read_text())["runs"])))
        return
    require_bench_inputs(args.lf_venv, args.skip_peer)
    work = Path(tempfile.mkdtemp(prefix="lora-peer-bench-"))
    tools = ["pipeline", "recipe"] + ([] if args.skip_peer else list(LF_SETTINGS))
    records: dict[str, list[dict]] = {tool: [] for tool in tools}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        base = build_tiny_base(work)
        data_dir = None if args.skip_peer else lf_data_dir(work)
        token_cache: dict = {}
        runners = {
            "pipeline": lambda folder: run_pipeline(base, folder, args.no_quant),
            "recipe": lambda folder: run_recipe(base, folder, args.no_quant),
            "lf_shared": lambda folder: run_llamafactory(args.lf_venv, base, data_dir, folder, args.no_quant,
                                                         best_cpu=False, token_cache=token_cache),
            "lf_best": lambda folder: run_llamafactory(args.lf_venv, base, data_dir, folder, args.no_quant,
                                                       best_cpu=True, token_cache=token_cache),
        }
        for round_index in range(args.rounds):
            # Rotate who goes first, so no tool always meets a cold (or a warm) machine.
            order = tools[round_index % len(tools):] + tools[:round_index % len(tools)]
            for tool in order:
                try:
                    record = runners[tool](work / f"{tool}-{round_index}")
                except RunFailed as failure:
                    if tool not in LF_SETTINGS:
                        raise
                    # A peer's failure is a finding to report, not a reason to lose the other measurements.
                    record = {"error": str(failure)}
                    print(f"round {round_index + 1} {tool} FAILED: {failure}", file=sys.stderr, flush=True)
                records[tool].append(record)
                if "error" not in record:
                    print(f"round {round_index + 1} {LABELS[tool]:<28} wall {record['wall_s']:6.1f}s  train "
                          f"{record['train_s']:6.1f}s  {record['tokens_per_s']:6.0f} tokens/s  peak "
                          f"{record['peak_rss_mb']:5.0f} MB  loss {record['train_loss']:.4f}", flush=True)
    except RunFailed as failure:
        sys.exit(f"failed: {failure}\n(work folder kept: {work})")
    summary = summarize(records)
    print(format_table(summary))
    report = {"variant": "LoRA" if args.no_quant else "QLoRA", "rounds": args.rounds, "started": started,
              "code": code_state(), "targets": TARGETS, "runs": records, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"figures written to {args.out}")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
