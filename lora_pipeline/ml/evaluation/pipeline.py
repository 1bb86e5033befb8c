"""Base, adapters and merged model scored on one suite, and how sure each difference is. Dagster-free.

The base is loaded once; every adapter trained on it is attached with `load_adapter` and scored
with `set_adapter`, the base itself with `disable_adapter` (ml/adapters.py), all on the same
examples with the same decoding, so every difference is paired. Scores already computed for the
same weights on the same suite are passed in (`cached`) and not recomputed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_pipeline.ml.evaluation.per_example import probe_losses, score_model
from lora_pipeline.ml.evaluation.suite import EvalSuite, probe_frame

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.ml.base.precision import DeviceInfo

LOWER_IS_BETTER = {"loss"}
# What "loss" means wherever a held-out loss is shown (log, CLI, --json, report, leaderboard, card, README).
LOSS_DEFINITION = "mean over examples of each example's loss per response token"


@dataclass
class EvaluationResult:
    """Per model: summary metrics, per-example scores and 95% intervals; paired comparisons; the forgetting probe."""

    metrics: dict[str, dict[str, float]]
    per_example: dict[str, "pd.DataFrame"]
    intervals: dict[str, dict[str, dict]]
    comparisons: list[dict]
    forgetting: dict | None
    samples: list[dict[str, str]]
    examples: int
    scored_now: list[str] = field(default_factory=list)
    benchmarks: dict[str, dict] = field(default_factory=dict)  # model -> task -> metric -> value
    per_source: dict[str, dict] = field(default_factory=dict)  # a mixture's: source -> examples and each model's loss


def summary_of(scores: "pd.DataFrame", metrics: tuple[str, ...]) -> dict[str, float]:
    """loss: the mean over examples of each one's loss per response token, the one definition every report, gate,
    interval and leaderboard uses (LOSS_DEFINITION); token_loss and perplexity over all response tokens together
    (as training logs it), token accuracy likewise; and each metric's mean over examples."""
    tokens = float(scores["tokens"].sum())
    token_loss = float(scores["loss_sum"].sum()) / max(tokens, 1.0)
    summary = {"loss": float(scores["loss"].mean()), "token_loss": token_loss,
               "perplexity": math.exp(min(token_loss, 50.0)),
               "token_accuracy": float(scores["correct"].sum()) / max(tokens, 1.0), "tokens": int(tokens)}
    summary.update({f"mean_{metric}": float(scores[metric].mean()) for metric in metrics if metric in scores})
    return summary


def per_source_of(per_example: dict[str, "pd.DataFrame"], frame: "pd.DataFrame") -> dict[str, dict]:
    """Of a mixture's held-out examples (a `source` column with several sources): per source, in the order they
    first appear, its examples and each model's loss (per-example mean, as everywhere), so a mixture shows what
    training did to each of its sources. {} for one source."""
    if "source" not in frame.columns or frame["source"].nunique() < 2:
        return {}
    sources = frame["source"].to_numpy()
    return {name: {"examples": int((sources == name).sum()),
                   **{model: float(scores["loss"].to_numpy()[sources == name].mean())
                      for model, scores in per_example.items()}}
            for name in dict.fromkeys(sources)}


def intervals_of(scores: "pd.DataFrame", metrics: tuple[str, ...], resamples: int) -> dict[str, dict]:
    """Each metric's mean over examples with its bootstrap 95% interval."""
    from lora_pipeline.ml.scoring.paired import mean_interval

    return {metric: mean_interval(scores[metric].to_numpy(), resamples=resamples).as_dict()
            for metric in metrics if metric in scores}


def compare(metric: str, candidate: str, reference: str, per_example: dict, resamples: int, margin: float) -> dict:
    """Paired bootstrap comparison of two scored models on one metric (same examples), with its verdict and sentence."""
    from lora_pipeline.ml.scoring.paired import paired_bootstrap

    comparison = paired_bootstrap(
        metric, candidate, reference, per_example[candidate][metric].to_numpy(),
        per_example[reference][metric].to_numpy(), higher_is_better=metric not in LOWER_IS_BETTER, resamples=resamples,
    )
    return {**comparison.as_dict(margin), "sentence": comparison.sentence(margin)}


def score_on_base(base_dir: Path, adapters: dict[str, Path], suite: EvalSuite, device: "DeviceInfo",
                  include_base: bool = True, cached: dict | None = None, log: Callable[[str], None] | None = None,
                  trust_remote_code: bool = False, tokenizer_dir: Path | None = None,
                  probe_adapter: str | None = None) -> tuple[dict, dict, object]:
    """Score the base (unless cached or not wanted) and each adapter on it, loading the base once.

    With probe_adapter, base and that adapter also get the general-text forgetting probe.
    Returns ({name: per-example scores} for the models scored now, {name: probe losses}, the tokenizer).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.adapters import attach_adapters, using
    from lora_pipeline.ml.base.precision import device_map_for

    cached = cached or {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or next(iter(adapters.values()), base_dir),
                                              trust_remote_code=trust_remote_code)
    wanted = {name: path for name, path in adapters.items() if name not in cached or name == probe_adapter}
    if not wanted and (not include_base or "base" in cached):
        return {}, {}, tokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map_for(device),
                                                trust_remote_code=trust_remote_code)
    probe = probe_frame(tokenizer) if probe_adapter else None
    scored: dict = {}
    probed: dict = {}
    model = attach_adapters(base, wanted) if wanted else base
    with using(model, None) if wanted else contextlib.nullcontext():
        if include_base and "base" not in cached:
            scored["base"] = score_model(model, tokenizer, suite, log, "base")
        if probe is not None:
            probed["base"] = probe_losses(model, tokenizer, probe, suite.batch_size)
    for name in wanted:
        with using(model, name):
            if name not in cached:
                scored[name] = score_model(model, tokenizer, suite, log, name)
            if name == probe_adapter:
                probed[name] = probe_losses(model, tokenizer, probe, suite.batch_size)
    return scored, probed, tokenizer


def forgetting_of(probed: dict, adapter: str, resamples: int) -> dict:
    """Loss of base and adapter on the shipped general-text sample, and the paired difference."""
    base_losses, adapter_losses = probed["base"], probed[adapter]
    base_loss = float(base_losses["loss_sum"].sum() / base_losses["tokens"].sum())
    adapter_loss = float(adapter_losses["loss_sum"].sum() / adapter_losses["tokens"].sum())
    return {
        "passages": len(base_losses),
        "base_loss": base_loss,
        "adapter_loss": adapter_loss,
        "relative_change": (adapter_loss - base_loss) / base_loss if base_loss else 0.0,
        "paired": compare("loss", adapter, "base", {"base": base_losses, adapter: adapter_losses}, resamples, 0.0),
    }


def benchmark_base_and_adapter(base_dir: Path, adapter_dir: Path, tasks: list[str], device: "DeviceInfo",
                               include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
                               log: Callable[[str], None] | None = None,
                               trust_remote_code: bool = False) -> dict[str, dict]:
    """lm-evaluation-harness tasks on the base and on the base with the adapter, one loaded base for both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.adapters import attach_adapters, using
    from lora_pipeline.ml.base.precision import device_map_for
    from lora_pipeline.ml.benchmarks import run_benchmarks

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map_for(device),
                                                trust_remote_code=trust_remote_code)
    model = attach_adapters(base, {"adapter": adapter_dir})
    results = {}
    for name in ("base", "adapter"):
        with using(model, None if name == "base" else name):
            results[name] = run_benchmarks(model, tokenizer, tasks, include_path=include_path, limit=limit,
                                           batch_size=batch_size)
        if log:
            log(f"{name}: benchmarks " + "; ".join(
                f"{task} " + ", ".join(f"{metric} {value:.3f}" for metric, value in scores.items()
                                       if not metric.endswith("_stderr"))
                for task, scores in results[name].items()))
    return results


def score_blends(base_dir: Path, adapters: dict[str, Path], blends: list, suite: EvalSuite, device: "DeviceInfo",
                 save_to: Path, log: Callable[[str], None] | None = None,
                 trust_remote_code: bool = False) -> dict[str, tuple["pd.DataFrame", Path]]:
    """Weighted blends (ml.adapters.Blend) of adapters trained on one base, each scored on the suite and saved as
    an adapter folder under save_to; the base is loaded once. Returns {blend: (per-example scores, its folder)}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.ml.adapters import Blend, adapter_name, add_blend, attach_adapters, using
    from lora_pipeline.ml.base.precision import device_map_for

    tokenizer = AutoTokenizer.from_pretrained(next(iter(adapters.values())), trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map_for(device),
                                                trust_remote_code=trust_remote_code)
    model = attach_adapters(base, {adapter_name(key): path for key, path in adapters.items()})
    scored = {}
    for blend in blends:
        name = add_blend(model, Blend(adapter_name(blend.name), tuple(adapter_name(a) for a in blend.adapters),
                                      blend.weights, blend.combination, blend.density))
        with using(model, name):
            scores = score_model(model, tokenizer, suite, log, blend.name)
        model.save_pretrained(str(save_to), selected_adapters=[name])  # PEFT writes it to save_to/<name>/
        folder = save_to / blend.name
        if name != blend.name:
            (save_to / name).rename(folder)
        tokenizer.save_pretrained(str(folder))
        scored[blend.name] = (scores, folder)
    return scored


def sample_indices(frame: "pd.DataFrame", count: int) -> list[int]:
    """Examples to show answered side by side: one per distinct task line first."""
    task_lines = frame["prompt"].str.split("\n").str[1].fillna(frame["prompt"])
    distinct = list(task_lines.drop_duplicates().index)
    rest = [index for index in frame.index if index not in set(distinct)]
    return [int(index) for index in (distinct + rest)[:count]]


def evaluate_pipeline(
    quantized_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    suite: EvalSuite,
    device: "DeviceInfo",
    *,
    sample_count: int = 4,
    resamples: int = 2000,
    margin: float = 0.0,
    other_adapters: dict[str, Path] | None = None,
    original_dir: Path | None = None,
    cached: dict | None = None,
    probe: bool = True,
    benchmarks: dict | None = None,
    log: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
) -> EvaluationResult:
    """Score base, adapter (and `other_adapters`, e.g. the current champion) on one loaded base, then the merged model.

    With original_dir, a merge into those unquantized weights is scored too (in memory), so the
    report shows what merging into the original weights would cost. benchmarks: {"tasks", "include_path",
    "limit"} for lm-evaluation-harness tasks on base and adapter.
    """
    from lora_pipeline.ml.base.loading import load_full_precision

    log = log or (lambda message: None)
    cached = dict(cached or {})
    adapters = {"adapter": adapter_dir, **(other_adapters or {})}
    scored, probed, tokenizer = score_on_base(quantized_dir, adapters, suite, device, cached=cached, log=log,
                                              trust_remote_code=trust_remote_code, tokenizer_dir=adapter_dir,
                                              probe_adapter="adapter" if probe else None)
    if "merged" not in cached:
        from transformers import AutoModelForCausalLM

        from lora_pipeline.ml.base.precision import device_map_for

        merged = AutoModelForCausalLM.from_pretrained(merged_dir, device_map=device_map_for(device),
                                                      trust_remote_code=trust_remote_code)
        scored["merged"] = score_model(merged, tokenizer, suite, log, "merged")
        del merged
    if original_dir is not None and "merged_into_original" not in cached:
        from peft import PeftModel

        merged_original = PeftModel.from_pretrained(load_full_precision(original_dir, trust_remote_code),
                                                    adapter_dir).merge_and_unload()
        scored["merged_into_original"] = score_model(merged_original.to(device.device), tokenizer, suite, log,
                                                     "merged_into_original")
    per_example = {**cached, **scored}
    order = ["base", "adapter", *(other_adapters or {}), "merged", "merged_into_original"]
    per_example = {name: per_example[name] for name in order if name in per_example}
    metrics = {name: summary_of(scores, suite.metrics) for name, scores in per_example.items()}
    comparisons = [compare(metric, "adapter", "base", per_example, resamples, margin) for metric in suite.metrics]
    comparisons.append(compare("loss", "merged", "adapter", per_example, resamples, 0.0))
    for other in other_adapters or {}:
        comparisons += [compare(metric, "adapter", other, per_example, resamples, margin) for metric in suite.metrics]
    forgetting = forgetting_of(probed, "adapter", resamples) if probe else None
    if forgetting:
        log(f"forgetting probe: general-text loss {forgetting['base_loss']:.4f} (base) -> "
            f"{forgetting['adapter_loss']:.4f} (adapter), {forgetting['relative_change']:+.1%}")
    samples = []
    for index in sample_indices(suite.frame, sample_count):
        row = suite.frame.iloc[index]
        sample = {"example": index, "prompt": row["prompt"], "reference": row["completion"].strip()}
        sample.update({name: scores["answer"].iloc[index] for name, scores in per_example.items() if "answer" in scores})
        samples.append(sample)
    return EvaluationResult(
        metrics=metrics,
        per_example=per_example,
        intervals={name: intervals_of(scores, suite.metrics, resamples) for name, scores in per_example.items()},
        comparisons=comparisons,
        forgetting=forgetting,
        samples=samples,
        examples=len(suite.frame),
        scored_now=list(scored),
        per_source=per_source_of(per_example, suite.frame),
        benchmarks=benchmark_base_and_adapter(quantized_dir, adapter_dir, benchmarks["tasks"], device,
                                              benchmarks.get("include_path"), benchmarks.get("limit"),
                                              suite.batch_size, log, trust_remote_code)
        if benchmarks and benchmarks.get("tasks") else {},
    )
