"""DPO against a peer (issue 27, item 5): the pipeline's DPO and LLaMA-Factory 0.9.5's, on the same pairs.

Builds the tiny base once (../shared/bench/make_tiny_base.py), derives preference pairs from
../shared/data/alpaca_en_demo.json (no preference file is shared): each row's instruction (and input,
joined with a newline as LLaMA-Factory joins them) is the prompt, its output the chosen answer, and another
row's output, picked by a seeded RNG, the rejected one. Pairs whose prompt and longer answer do not fit
max_length (in both tools' tokenizations) are left out, so neither tool truncates anything (they would cut
differently: LLaMA-Factory shares cutoff_len between prompt and answer, TRL keeps the start). The split is this project's: by a hash of the rendered prompt (tokenize_pairs' held_out).

Both tools render the pairs with LLaMA-Factory's alpaca template (its system sentence, "### Instruction:",
"### Response:"); the pipeline gets it as an inline Jinja template (dataset.template), so both train on the
same prompt tokens. LLaMA-Factory's answers end with EOS and then "\\n\\n" (its alpaca assistant slot: two
tokens more per answer than the pipeline's, which end in EOS); the bench checks this token by token and
records it.

Each round runs both tools, one after the other (rotating who goes first), on the same base, pairs and
settings: DPO, sigmoid loss, beta 0.1, a fresh LoRA r16 alpha32 dropout 0.05 on all seven projections
(both trainers disable dropout during DPO), the reference the base with adapters off, lr 5e-4 linear with no
warm-up, grad norm 1.0, fused AdamW, batch 4 x 1, one epoch, max length 256, fp32, no gradient
checkpointing, seed 0, logging every 5 steps:

  pipeline       `lora_pipeline.cli run configs/bench/dpo-parity.yaml --select +trained_adapter` in a fresh
                 DAGSTER_HOME and LORA_PIPELINE_STORAGE (raw pairs -> adapter). Its one difference in
                 method: batches of pairs of like length (transformers' LengthGroupedSampler), which leaves out
                 most of the padding LLaMA-Factory computes on; the same pairs, steps and settings otherwise
  llamafactory   `llamafactory-cli train` with bench/peers_dpo/llamafactory_lora_dpo.yaml (stage dpo,
                 pref_loss sigmoid, its best CPU settings: bf16 false, no gradient checkpointing)

--qlora: both on the base quantized to NF4 with double quantization (the pipeline's quantized_base,
LLaMA-Factory's quantization_bit 4).

Each runs under /usr/bin/time -v while its process tree's RSS is sampled (bench/_runs.py): wall s, peak RSS
and CPU s from outside, the same for both; train s is each trainer's own train() time. tokens/s counts, for
each tool from its own token ids, the real (non-pad) tokens of every training pair's chosen and rejected
sequences (the prompt in both) over train s. Then both adapters are scored by the same code on the same
held-out pairs (this project's score_on_base and preference_report, on the unquantized base): preference
accuracy (the implicit reward, beta times the log-probability gain over the reference, ranks the chosen
answer first) with its bootstrap interval, and the mean reward margin. The pairs are scored as the pipeline
renders them; LLaMA-Factory's adapter is also scored on its own rendering (its answers' trailing "\\n\\n").

Prints a table (medians over rounds, runs with others' CPU share above 10% left out when a quiet one
exists) and the pipeline's ratios against LLaMA-Factory, with targets: wall <= 0.8, held-out preference
accuracy no worse (the paired bootstrap interval of the pipeline's minus LLaMA-Factory's accuracy reaches 0
or above). Writes every run's figures to bench/results/dpo_parity.json.
Machines here are shared and noisy: quote the ratios of one invocation, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from _runs import DATA, REPO, RunFailed, build_tiny_base, code_state, finish_record, quiet_medians, run_measured
from _runs import require_bench_inputs

PEERS_DPO = REPO / "bench" / "peers_dpo"
PIPELINE_DPO_CONFIG = "configs/bench/dpo-parity.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "dpo_parity.json"
DEFAULT_LF_VENV = REPO.parent / "lf_venv"
TOOLS = ("pipeline", "llamafactory")
LABELS = {"pipeline": "pipeline", "llamafactory": "LLaMA-Factory (best CPU)"}
FIGURES = ("wall_s", "train_s", "outside_training_s", "tokens_per_s", "peak_rss_mb", "train_loss", "cpu_s",
           "others_cpu_share", "preference_accuracy", "reward_margin")
TARGETS = {"wall": 0.8, "preference_accuracy": "no worse"}
LF_TRAIN, LF_HELD_OUT = "dpo_pairs_train", "dpo_pairs_held_out"

# LLaMA-Factory 0.9.5's alpaca template (llamafactory/data/template.py): its default system sentence, the user
# slot "### Instruction:\n{content}\n\n### Response:\n", the assistant slot "{content}", EOS, "\n\n".
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n")
ALPACA_JINJA = (
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{%- else %}{{ '" + ALPACA_SYSTEM.replace("\n", "\\n") + "' }}{%- endif %}"
    "{%- for message in messages if message.role != 'system' %}"
    "{%- if message.role == 'user' %}{{ '### Instruction:\\n' + message.content + '\\n\\n### Response:\\n' }}"
    "{%- else %}{{ message.content + eos_token + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class BenchSettings:
    """What both tools are given (and how the pairs are made)."""

    pairs: int = 400  # at most; fewer when fewer fit max_length
    max_length: int = 256
    eval_fraction: float = 0.15
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    learning_rate: float = 5e-4  # at 5e-5 neither tool moves the held-out pairs in one epoch: nothing to compare
    batch_size: int = 4
    grad_accumulation: int = 1
    epochs: float = 1.0
    logging_steps: int = 5
    seed: int = 0
    pair_seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    qlora: bool = False


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- the pairs ------------------------------------------------------------------------------------

def derive_pairs(rows: list[dict], seed: int) -> list[dict]:
    """One pair per alpaca row: its instruction (+ "\\n" + input) as the prompt, its output chosen, and the output of
    another row (seeded RNG; a different answer) rejected. Deterministic for a seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for index, row in enumerate(rows):
        prompt = "\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
        while True:
            other = int(rng.integers(len(rows)))
            if other != index and rows[other]["output"].strip() != row["output"].strip():
                break
        pairs.append({"prompt": prompt, "chosen": row["output"], "rejected": rows[other]["output"]})
    return pairs


def alpaca_template():
    from lora_pipeline.ml.data.templates import Template

    return Template("inline", ALPACA_JINJA)


def render_pairs(pairs: list[dict], tokenizer, eval_fraction: float, max_length: int):
    """The pairs as the pipeline tokenizes them (prompt_ids, chosen_ids, rejected_ids, held_out, ...)."""
    import pandas as pd

    from lora_pipeline.ml.preference.data import pairs_of, tokenize_pairs

    def where(index: int) -> str:
        return f"pair {index}"

    return tokenize_pairs(pairs_of(pd.DataFrame(pairs), where), tokenizer, alpaca_template(), where, eval_fraction,
                          max_length).frame


LF_EXTRA_ANSWER_TOKENS = 2  # LLaMA-Factory's alpaca answers end EOS "\n\n": two "\n" tokens of the tiny base's BPE


def select_pairs(pairs: list[dict], frame, count: int, max_length: int) -> list[int]:
    """Indices of the first `count` distinct (prompt, chosen, rejected) pairs that fit max_length as both tools
    tokenize them (LLaMA-Factory's answers are LF_EXTRA_ANSWER_TOKENS longer)."""
    seen, chosen = set(), []
    for index, (prompt, answer, other) in enumerate(zip(frame["prompt_ids"], frame["chosen_ids"], frame["rejected_ids"])):
        identity = (pairs[index]["prompt"], pairs[index]["chosen"], pairs[index]["rejected"])
        if len(prompt) + max(len(answer), len(other)) + LF_EXTRA_ANSWER_TOKENS > max_length or identity in seen:
            continue
        seen.add(identity)
        chosen.append(index)
        if len(chosen) == count:
            break
    return chosen


def real_tokens(frame, epochs: float) -> int:
    """Non-pad tokens a tool trains on: every pair's chosen and rejected sequences, the prompt in both."""
    prompts = frame["prompt_ids"].map(len)
    return int(round(sum(2 * prompts + frame["chosen_ids"].map(len) + frame["rejected_ids"].map(len)) * epochs))


@dataclass
class PairData:
    """The pair files both tools read and the pipeline's tokenization of them."""

    folder: Path
    all_file: Path  # every selected pair: the pipeline splits it itself
    train: object  # DataFrame: the pipeline's training pairs
    held_out: object  # DataFrame: the held-out pairs both are scored on
    counts: dict = field(default_factory=dict)


def prepare_pairs(base: Path, work: Path, settings: BenchSettings) -> PairData:
    """Derive, select and split the pairs; write all.json (the pipeline's input) and, for LLaMA-Factory, the train
    and held-out files with a dataset_info.json registering them as ranking (preference) data."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs = derive_pairs(json.loads(DATA.read_text()), settings.pair_seed)
    frame = render_pairs(pairs, tokenizer, settings.eval_fraction, settings.max_length)
    keep = select_pairs(pairs, frame, settings.pairs, settings.max_length)
    selected = [pairs[index] for index in keep]
    frame = frame.iloc[keep].reset_index(drop=True)
    folder = work / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    held = frame["held_out"].to_numpy(dtype=bool)
    files = {"all": selected, "train": [p for p, h in zip(selected, held) if not h],
             "held_out": [p for p, h in zip(selected, held) if h]}
    for name, rows in files.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}  # no query, response or system
    (folder / "dataset_info.json").write_text(json.dumps({
        LF_TRAIN: {"file_name": "train.json", "formatting": "alpaca", "ranking": True, "columns": columns},
        LF_HELD_OUT: {"file_name": "held_out.json", "formatting": "alpaca", "ranking": True, "columns": columns},
    }, indent=2))
    train, held_out = frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
    counts = {"derived": len(pairs), "fitting": len(keep), "train": len(train), "held_out": len(held_out),
              "train_real_tokens_per_epoch": real_tokens(train, 1.0)}
    return PairData(folder, folder / "all.json", train, held_out, counts)


# --- the pipeline ---------------------------------------------------------------------------------

def pipeline_overrides(base: Path, pairs_file: Path, settings: BenchSettings) -> list[str]:
    """--set arguments that put this invocation's settings over configs/bench/dpo-parity.yaml."""
    values = {
        "base_model": str(base), "dataset.source": str(pairs_file), "dataset.eval_fraction": settings.eval_fraction,
        "training.max_length": settings.max_length, "training.learning_rate": settings.learning_rate,
        "training.batch_size": settings.batch_size, "training.grad_accumulation": settings.grad_accumulation,
        "training.epochs": settings.epochs, "training.logging_steps": settings.logging_steps,
        "training.seed": settings.seed, "preference.beta": settings.beta, "preference.loss_type": settings.loss_type,
        "preference.label_smoothing": settings.label_smoothing, "lora.r": settings.lora_r,
        "lora.alpha": settings.lora_alpha, "lora.dropout": settings.lora_dropout,
        "quantization.mode": "nf4" if settings.qlora else "none",
    }
    command = []
    for key, value in values.items():
        command += ["--set", f"{key}={value}"]
    return command


def pipeline_cli_command(base: Path, pairs_file: Path, settings: BenchSettings) -> list[str]:
    return [sys.executable, "-m", "lora_pipeline.cli", "run", PIPELINE_DPO_CONFIG, "--select", "+trained_adapter",
            *pipeline_overrides(base, pairs_file, settings), "--json"]


def parse_pipeline_dpo_output(stdout: str) -> dict:
    """Figures from `run --json`'s last line: trained_adapter's metadata (train_seconds, steps, the last logged loss
    and reward margin, the adapter's folder) and formatted_dataset's split counts."""
    assets = json.loads(stdout.strip().splitlines()[-1])["assets"]
    adapter = assets["trained_adapter"]
    meta = adapter.get("metadata", {})
    formatted = assets.get("formatted_dataset", {}).get("metadata", {})
    uri = meta.get("uri") or adapter.get("uri")
    return {
        "train_s": float(meta["train_seconds"]),
        "steps": meta.get("steps"),
        "train_loss": _float_or_none(meta.get("final_logged_loss")),
        "last_reward_margin": _float_or_none(meta.get("last_reward_margin")),
        "last_reward_accuracy": _float_or_none(meta.get("last_reward_accuracy")),
        "adapter_dir": str(uri).removeprefix("file://") if uri else None,
        "split": {key: formatted.get(key) for key in ("train_rows", "eval_rows", "duplicates", "over_max_length")
                  if key in formatted},
        "reused": meta.get("reused"),
    }


def _float_or_none(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def run_pipeline_dpo(base: Path, data: PairData, work: Path, settings: BenchSettings) -> dict:
    """The pipeline's DPO through its CLI, measured, in a fresh store and Dagster instance."""
    work.mkdir(parents=True, exist_ok=True)
    state = code_state()
    (work / "dagster").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(work / "dagster"), "LORA_PIPELINE_STORAGE": str(work / "store")}
    measured = run_measured(pipeline_cli_command(base, data.all_file, settings), work / "pipeline", env)
    figures = parse_pipeline_dpo_output(measured.stdout)
    split = figures.get("split") or {}
    if split.get("train_rows") not in (None, len(data.train)) or split.get("eval_rows") not in (None, len(data.held_out)):
        raise RunFailed(f"the pipeline split the pairs {split}, the bench {len(data.train)} train + "
                        f"{len(data.held_out)} held out: they do not train on the same pairs")
    tokens = real_tokens(data.train, settings.epochs)
    figures.update(train_tokens=tokens, tokens_per_s=tokens / figures["train_s"])
    return {**finish_record(measured, figures), "code": state}


# --- LLaMA-Factory --------------------------------------------------------------------------------

def lf_run_config(template_text: str, base: Path, data_dir: Path, out: Path, settings: BenchSettings) -> dict:
    """The DPO YAML with its placeholders filled and this invocation's settings put over it."""
    filled = template_text.replace("BASE_DIR", str(base)).replace("DATA_DIR", str(data_dir)).replace("OUT_DIR", str(out))
    config = yaml.safe_load(filled)
    config.update({
        "dataset": LF_TRAIN, "cutoff_len": settings.max_length, "learning_rate": settings.learning_rate,
        "per_device_train_batch_size": settings.batch_size, "gradient_accumulation_steps": settings.grad_accumulation,
        "num_train_epochs": settings.epochs, "logging_steps": settings.logging_steps, "seed": settings.seed,
        "pref_beta": settings.beta, "pref_loss": settings.loss_type, "dpo_label_smoothing": settings.label_smoothing,
        "lora_rank": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
    })
    return config


def lf_yaml_template(qlora: bool) -> str:
    return (PEERS_DPO / ("llamafactory_qlora_dpo.yaml" if qlora else "llamafactory_lora_dpo.yaml")).read_text()


def lf_env(out: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "cache")}


def parse_lf_pair_tokens(text: str):
    """llamafactory_pair_tokens.py's file as a frame of prompt_ids, chosen_ids, rejected_ids."""
    import pandas as pd

    ids = json.loads(text)
    return pd.DataFrame({name: ids[name] for name in ("prompt_ids", "chosen_ids", "rejected_ids")})


def parse_lf_dpo_results(all_results: dict, trainer_state: dict | None, real: int) -> dict:
    """Figures from LLaMA-Factory's all_results.json and trainer_state.json (the logged loss and reward figures).

    tokens/s is the real tokens counted from its own dataset (real, per epoch) times the epochs over
    train_runtime; its effective_tokens_per_sec counts the same for DPO (chosen + rejected lengths, unpadded)."""
    epochs = float(all_results.get("epoch", 1.0))
    train_s = float(all_results["train_runtime"])
    logs = [entry for entry in (trainer_state or {}).get("log_history", []) if "loss" in entry]
    tokens = int(round(real * epochs))
    return {
        "train_s": train_s,
        "steps": (trainer_state or {}).get("global_step"),
        "train_loss": float(logs[-1]["loss"]) if logs else None,
        "mean_logged_loss": statistics.fmean(entry["loss"] for entry in logs) if logs else None,
        "epoch_train_loss": float(all_results["train_loss"]) if "train_loss" in all_results else None,
        "last_reward_margin": _float_or_none(logs[-1].get("rewards/margins")) if logs else None,
        "last_reward_accuracy": _float_or_none(logs[-1].get("rewards/accuracies")) if logs else None,
        "train_tokens": tokens,
        "tokens_per_s": tokens / train_s,
        "lf_effective_tokens_per_s": all_results.get("effective_tokens_per_sec"),
    }


def lf_pair_tokens(lf_venv: Path, run_yaml: Path, dataset: str, work: Path, env: dict):
    """LLaMA-Factory's own tokenization of one of the pair files (a frame), without training."""
    target = work / f"{dataset}.tokens.json"
    run_measured([str(lf_venv / "bin" / "python"), str(PEERS_DPO / "llamafactory_pair_tokens.py"), str(run_yaml),
                  dataset, str(target)], work / f"tokens_{dataset}", env)
    return parse_lf_pair_tokens(target.read_text())


def run_llamafactory_dpo(lf_venv: Path, base: Path, data: PairData, work: Path, settings: BenchSettings,
                         token_cache: dict) -> dict:
    """`llamafactory-cli train` on the DPO YAML, measured; its token ids read once (before the first run)."""
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    config = lf_run_config(lf_yaml_template(settings.qlora), base, data.folder, out, settings)
    run_yaml = work / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    env = lf_env(work)
    if "train" not in token_cache:
        token_cache["train"] = lf_pair_tokens(lf_venv, run_yaml, LF_TRAIN, work, env)
        token_cache["held_out"] = lf_pair_tokens(lf_venv, run_yaml, LF_HELD_OUT, work, env)
    measured = run_measured([str(lf_venv / "bin" / "llamafactory-cli"), "train", str(run_yaml)], work / "llamafactory", env)
    state_file = out / "trainer_state.json"
    trainer_state = json.loads(state_file.read_text()) if state_file.exists() else None
    figures = parse_lf_dpo_results(json.loads((out / "all_results.json").read_text()), trainer_state,
                                   real_tokens(token_cache["train"], 1.0))
    figures["adapter_dir"] = str(out)
    figures["settings"] = {"bf16": config.get("bf16"),
                           "gradient_checkpointing": not config.get("disable_gradient_checkpointing", False),
                           "quantization_bit": config.get("quantization_bit")}
    return finish_record(measured, figures)


def compare_renderings(ours, theirs) -> dict:
    """Token by token, per pair: the same prompt ids; answers the same, or the same up to what follows LLaMA-Factory's
    EOS (its alpaca template's "\\n\\n")."""
    if len(ours) != len(theirs):
        return {"pairs": [len(ours), len(theirs)], "same_prompts": 0, "same_answers": 0,
                "same_answers_up_to_eos": 0, "extra_tokens_after_eos": None}
    same_prompts = sum(list(a) == list(b) for a, b in zip(ours["prompt_ids"], theirs["prompt_ids"]))
    same, up_to_eos, extra = 0, 0, set()
    for side in ("chosen_ids", "rejected_ids"):
        for a, b in zip(ours[side], theirs[side]):
            a, b = list(a), list(b)
            same += a == b
            if b[:len(a)] == a:
                up_to_eos += 1
                extra.add(tuple(b[len(a):]))
    return {"pairs": len(ours), "same_prompts": int(same_prompts), "same_answers": int(same),
            "same_answers_up_to_eos": int(up_to_eos), "answers": 2 * len(ours),
            "extra_tokens_after_eos": [list(tokens) for tokens in sorted(extra)]}


# --- scoring --------------------------------------------------------------------------------------

def score_adapter(base: Path, adapter_dir: Path, held_out, beta: float, resamples: int = 2000) -> dict:
    """This project's held-out scoring of one adapter against the bare base (the DPO reference), on the fp32 base."""
    from lora_pipeline.ml.preference.evaluation import preference_report, score_on_base

    scores = score_on_base(base, {"reference": None, "tuned": adapter_dir}, held_out)
    report = preference_report(scores["tuned"], scores["reference"], beta, resamples=resamples)
    rewards = beta * ((scores["tuned"]["chosen_logp"] - scores["reference"]["chosen_logp"])
                      - (scores["tuned"]["rejected_logp"] - scores["reference"]["rejected_logp"]))
    correct = [1.0 if value > 0 else 0.0 if value < 0 else 0.5 for value in rewards]
    return {"report": report, "correct": correct}


def scored_record(record: dict, score: dict, own: dict | None = None) -> dict:
    report = score["report"]
    record = {**record, "preference_accuracy": report["preference_accuracy"]["tuned"]["value"],
              "preference_accuracy_ci95": report["preference_accuracy"]["tuned"]["ci95"],
              "reward_margin": report["reward_margin"]["value"], "reward_margin_ci95": report["reward_margin"]["ci95"],
              "likelihood_accuracy": report["likelihood_accuracy"]["tuned"]["value"],
              "held_out_pairs": report["pairs"], "per_pair_correct": score["correct"], "held_out_report": report}
    if own is not None:
        record["own_rendering"] = {"preference_accuracy": own["report"]["preference_accuracy"]["tuned"],
                                   "reward_margin": own["report"]["reward_margin"]}
    return record


# --- summary --------------------------------------------------------------------------------------

def summarize(records: dict[str, list[dict]], resamples: int = 2000) -> dict:
    """Medians per tool and the pipeline's ratios against LLaMA-Factory. Pure on the records.

    records maps "pipeline" and "llamafactory" to their runs' records; runs with an "error" are left out, and a
    tool's runs that shared the machine (others' CPU share above CONTENDED_SHARE) are left out of its medians
    when it has a quiet run. Accuracy is compared per held-out pair (paired bootstrap) on each tool's first run
    used (training is seeded, so the rounds' adapters are alike)."""
    from lora_pipeline.ml.scoring.paired import paired_bootstrap

    per_tool = quiet_medians(records, FIGURES)
    medians, used_runs, contended, failed = per_tool.medians, per_tool.used, per_tool.contended, per_tool.failed
    for tool, used in used_runs.items():
        medians[tool]["preference_accuracy_ci95"] = used[0].get("preference_accuracy_ci95")
    ratios = {}
    if {"pipeline", "llamafactory"} <= set(medians):
        ours, peer = medians["pipeline"], medians["llamafactory"]
        wall = ours["wall_s"] / peer["wall_s"]
        ratios["wall"] = {"ratio": wall, "target": f"<= {TARGETS['wall']}", "met": wall <= TARGETS["wall"]}
        ratios["train_s"] = {"ratio": ours["train_s"] / peer["train_s"]}
        ratios["tokens_per_s"] = {"ratio": ours["tokens_per_s"] / peer["tokens_per_s"]}
        ratios["peak_rss"] = {"ratio": ours["peak_rss_mb"] / peer["peak_rss_mb"]}
        a, b = used_runs["pipeline"][0].get("per_pair_correct"), used_runs["llamafactory"][0].get("per_pair_correct")
        if a and b and len(a) == len(b):
            comparison = paired_bootstrap("preference_accuracy", "pipeline", "llamafactory", a, b,
                                          higher_is_better=True, resamples=resamples)
            difference = comparison.difference
            ratios["preference_accuracy"] = {
                "difference": difference.value, "ci95": [difference.low, difference.high],
                "wins_ties_losses": [comparison.wins, comparison.ties, comparison.losses],
                "target": "no worse: the 95% interval of pipeline - LLaMA-Factory reaches 0",
                "met": difference.high >= 0, "point_no_worse": difference.value >= 0}
    return {"medians": medians, "ratios": ratios, "contended_runs": contended, "failed_runs": failed}


def format_table(summary: dict) -> str:
    """The medians as a markdown table, then one line per ratio."""
    def cell(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = ["| tool | runs | wall s | train s | outside training s | real tokens/s | peak RSS MB | held-out pref. acc "
             "(95% CI) | reward margin | last logged loss | CPU s | others' CPU % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for tool, m in summary["medians"].items():
        ci = m.get("preference_accuracy_ci95")
        accuracy = cell(m["preference_accuracy"], 3) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        lines.append(f"| {LABELS.get(tool, tool)} | {m['runs']} | {cell(m['wall_s'], 1)} | {cell(m['train_s'], 1)} "
                     f"| {cell(m['outside_training_s'], 1)} | {cell(m['tokens_per_s'])} | {cell(m['peak_rss_mb'])} "
                     f"| {accuracy} | {cell(m['reward_margin'], 4)} | {cell(m['train_loss'], 4)} | {cell(m['cpu_s'])} "
                     f"| {cell(None if m['others_cpu_share'] is None else 100 * m['others_cpu_share'])} |")
    for name, ratio in summary["ratios"].items():
        if name == "preference_accuracy":
            verdict = "met" if ratio["met"] else "NOT met"
            lines.append(f"pipeline - LLaMA-Factory held-out preference accuracy: {ratio['difference']:+.3f} "
                         f"(95% CI {ratio['ci95'][0]:+.3f} to {ratio['ci95'][1]:+.3f}; pairs won/tied/lost "
                         f"{'/'.join(map(str, ratio['wins_ties_losses']))}), target {ratio['target']}: {verdict}")
        elif "target" in ratio:
            verdict = "met" if ratio["met"] else "NOT met"
            lines.append(f"pipeline / LLaMA-Factory {name}: {ratio['ratio']:.3f}, target {ratio['target']}: {verdict}")
        else:
            lines.append(f"pipeline / LLaMA-Factory {name}: {ratio['ratio']:.3f}")
    for run in summary.get("contended_runs", []):
        lines.append(f"WARNING: the machine was shared during {run}")
    for run in summary.get("failed_runs", []):
        lines.append(f"FAILED: {run} (the whole error is in the JSON's runs)")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------

def _arguments() -> argparse.Namespace:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs both tools once, rotating order")
    parser.add_argument("--qlora", action="store_true", help="both on the base quantized to NF4 (double quant)")
    parser.add_argument("--skip-peer", action="store_true", help="leave LLaMA-Factory out")
    parser.add_argument("--pairs", type=int, default=defaults.pairs, help=f"at most this many pairs ({defaults.pairs})")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--grad-accumulation", type=int, default=defaults.grad_accumulation)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--beta", type=float, default=defaults.beta)
    parser.add_argument("--logging-steps", type=int, default=defaults.logging_steps,
                        help=f"both tools' logging interval (default {defaults.logging_steps})")
    parser.add_argument("--lf-venv", type=Path, default=DEFAULT_LF_VENV,
                        help=f"LLaMA-Factory's own venv, see ../shared/bench/peers/README.md (default {DEFAULT_LF_VENV})")
    parser.add_argument("--out", type=Path, help="JSON with every run's figures and the summary (default "
                        "bench/results/dpo_parity.json, with --qlora dpo_parity_qlora.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (base, pairs, adapters, logs)")
    parser.add_argument("--work", type=Path, help="the work folder (default: a new temporary one)")
    parser.add_argument("--from-json", type=Path, metavar="PATH", help="run nothing: print the table of a JSON this wrote")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.from_json:
        print(format_table(summarize(json.loads(args.from_json.read_text())["runs"])))
        return
    require_bench_inputs(args.lf_venv, args.skip_peer)
    settings = BenchSettings(pairs=args.pairs, max_length=args.max_length, learning_rate=args.learning_rate,
                             batch_size=args.batch_size, grad_accumulation=args.grad_accumulation, epochs=args.epochs,
                             beta=args.beta, logging_steps=args.logging_steps, qlora=args.qlora)
    out_file = args.out or (DEFAULT_OUT.with_name("dpo_parity_qlora.json") if args.qlora else DEFAULT_OUT)
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-dpo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tools = ["pipeline"] + ([] if args.skip_peer else ["llamafactory"])
    records: dict[str, list[dict]] = {tool: [] for tool in tools}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"work folder {work}", flush=True)
    try:
        base = build_tiny_base(work)
        data = prepare_pairs(base, work, settings)
        print(f"pairs: {data.counts}", flush=True)
        token_cache: dict = {}
        rendering: dict = {}
        runners = {
            "pipeline": lambda folder: run_pipeline_dpo(base, data, folder, settings),
            "llamafactory": lambda folder: run_llamafactory_dpo(args.lf_venv, base, data, folder, settings, token_cache),
        }
        for round_index in range(args.rounds):
            order = tools[round_index % len(tools):] + tools[:round_index % len(tools)]
            for tool in order:
                try:
                    record = runners[tool](work / f"{tool}-{round_index}")
                except RunFailed as failure:
                    record = {"error": str(failure)}
                    print(f"round {round_index + 1} {tool} FAILED: {failure}", file=sys.stderr, flush=True)
                    records[tool].append(record)
                    continue
                own = None
                if tool == "llamafactory" and not rendering:
                    rendering.update(train=compare_renderings(data.train, token_cache["train"]),
                                     held_out=compare_renderings(data.held_out, token_cache["held_out"]))
                score = score_adapter(base, Path(record["adapter_dir"]), data.held_out, settings.beta)
                if tool == "llamafactory" and not any("own_rendering" in run for run in records[tool]):
                    own = score_adapter(base, Path(record["adapter_dir"]), token_cache["held_out"], settings.beta)
                record = scored_record(record, score, own)
                records[tool].append(record)
                print(f"round {round_index + 1} {LABELS[tool]:<26} wall {record['wall_s']:6.1f}s  train "
                      f"{record['train_s']:6.1f}s  {record['tokens_per_s']:6.0f} tokens/s  peak "
                      f"{record['peak_rss_mb']:5.0f} MB  held-out pref. acc {record['preference_accuracy']:.3f}  "
                      f"margin {record['reward_margin']:+.4f}", flush=True)
    except RunFailed as failure:
        sys.exit(f"failed: {failure}\n(work folder kept: {work})")
    summary = summarize(records)
    print(format_table(summary))
    if rendering:
        print(f"rendering, pipeline vs LLaMA-Factory token ids: {json.dumps(rendering)}")
    report = {"variant": "QLoRA" if settings.qlora else "LoRA", "rounds": args.rounds,
              "started": started, "code": code_state(), "settings": asdict(settings), "pairs": data.counts,
              "rendering": rendering, "targets": TARGETS, "runs": records, **summary}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2))
    print(f"figures written to {out_file}")
    if args.keep or args.work:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
