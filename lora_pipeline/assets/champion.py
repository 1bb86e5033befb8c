"""The champion stage: promote the evaluated candidate only when every gate passes, keep a history, ship serving files.

The gates are the stage's blocking asset checks, so the UI shows them beside the decision and a
refused candidate stops the run (the `lora-pipeline` CLI exits 3); the assets before stay
published and the current champion stays current. A model's champions are an append-only
history in the artifact store (resources/records.py); for a sweep, the champion is the sweep's,
and only the variant its leaderboard recommends can become it.
"""


from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster._core.errors import DagsterInvalidPropertyError  # not exported at the top level

from lora_pipeline.assets.common import (
    Reads,
    pipeline_asset,
    publish_stage,
    read_json,
    resolve_model_config,
    stage_lineage,
    stage_output,
    write_json,
)
from lora_pipeline.config.schema import ModelConfig, TuningRunConfig
from lora_pipeline.ml import promotion
from lora_pipeline.ml.report.metrics_report import EXAMPLES_FILE
from lora_pipeline.resources.compute import Compute
from lora_pipeline.resources.records import ChampionHistory, ScoreCache
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactIntegrityError, ArtifactRef, ArtifactStore
from lora_pipeline.resources.tracking import ExperimentTracker

SWEEP_TAG = "lora_pipeline/sweep"
DECISION_FILE = "CHAMPION.json"
CANDIDATE_ASSETS = ("quantized_base", "trained_adapter", "merged_model", "eval_report")


def artifact_version(ref: ArtifactRef) -> str:
    """An artifact's version: its folder name in the store (the first 16 hex digits of its manifest's sha256)."""
    return ref.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class Decision:
    """The gates' verdicts on a candidate, and whose champion it would become."""

    owner: str  # the model (or sweep) whose champion this is
    candidate: dict  # {asset: {"uri", "sha256", "version"}}
    candidate_version: str
    current_version: str | None
    suite: str
    gates: list[promotion.Gate]
    serving: dict

    @property
    def promoted(self) -> bool:
        """Whether every gate passed."""
        return promotion.decide(self.gates)

    def summary(self, promoted: bool | None = None) -> dict:
        """The CLI's --json "champion" object: promoted, the current champion's version after the decision, the gates."""
        promoted = self.promoted if promoted is None else promoted
        return {"promoted": promoted, "version": self.candidate_version if promoted else self.current_version,
                "candidate": self.candidate_version, "model": self.owner,
                "gates": {gate.name: gate.as_dict() for gate in self.gates}}


def decide_promotion(storage: ArtifactStore, device, model_config: ModelConfig, partition: str, sweep: str | None,
                     refs: dict[str, ArtifactRef], log=None) -> Decision:
    """Evaluate every gate for the candidate made of `refs` (the partition's quantized base, adapter, merged model and report).

    The comparison with the current champion is paired: the champion's scores on the same suite
    come from the score cache, or are computed now (and cached) when the suite is new to it.
    """
    from lora_pipeline.ml.serving import read_servability

    settings = model_config.promotion
    owner = sweep or partition
    report_dir = storage.local_path(refs["eval_report"])
    document = read_json(report_dir / "metrics.json")
    lineage = read_json(report_dir / "LINEAGE.json")
    suite = lineage.get("suite", "")
    candidate = {name: {"uri": ref.uri, "sha256": ref.sha256, "version": artifact_version(ref)}
                 for name, ref in refs.items()}
    # Content digests, not artifact sha256s: equal weights made by two models (or sweep variants) match.
    candidate["quantized_base"]["content"] = storage.content_digest(refs["quantized_base"])[:16]
    candidate["trained_adapter"]["scores_key"] = lineage.get("weights", {}).get("adapter")
    candidate_version = artifact_version(refs["trained_adapter"])
    current = ChampionHistory(storage, owner).current()
    servability = read_servability(storage.local_path(refs["trained_adapter"]))
    if model_config.preference_tuning:
        gates = preference_gates(storage, model_config, refs, document, current, candidate_version, servability)
        if sweep is not None:
            gates.append(promotion.recommended(partition, _recommendation(storage, sweep), sweep))
        return Decision(owner, candidate, candidate_version, current.version if current else None, suite, gates,
                        {"mode": servability.mode, "rank": servability.rank, "reasons": list(servability.reasons)})
    gates = [
        promotion.better_than_base(document, settings),
        promotion.no_regression(
            _against_champion(storage, device, model_config, current, candidate_version, report_dir, suite, log)
            if current is not None else None,
            settings, current.version if current is not None else None),
        promotion.forgetting(document, settings),
        promotion.merge_fidelity(document, settings),
        promotion.servable(servability, settings),
        promotion.template_fidelity(*_template_fidelity(storage, model_config, refs, report_dir)),
    ]
    if sweep is not None:
        gates.append(promotion.recommended(partition, _recommendation(storage, sweep), sweep))
    return Decision(owner, candidate, candidate_version, current.version if current else None, suite, gates,
                    {"mode": servability.mode, "rank": servability.rank, "reasons": list(servability.reasons)})


def preference_gates(storage: ArtifactStore, model_config: ModelConfig, refs: dict[str, ArtifactRef], document: dict,
                     current, candidate_version: str, servability) -> list[promotion.Gate]:
    """The gates of a preference model: against its reference and the champion on held-out preference accuracy
    (both scored by eval_report on the same pairs), forgetting, merge fidelity, servable, template fidelity."""
    settings = model_config.promotion
    if current is None or current.version == candidate_version:
        against_champion = None
    else:
        against_champion = promotion.paired_entry(document, "preference_accuracy", "adapter", "champion")
        if against_champion is None:
            return [promotion.better_than_reference(document, settings),
                    promotion.Gate("no_regression", False, f"champion {current.version} was not scored beside the "
                                   "candidate (it is on another base); re-run eval_report once both share a base")]
    return [
        promotion.better_than_reference(document, settings),
        promotion.no_regression(against_champion, settings, current.version if current is not None else None),
        promotion.forgetting(document, settings),
        promotion.merge_fidelity(document, settings),
        promotion.servable(servability, settings),
        promotion.template_fidelity(*_pair_template_fidelity(storage, model_config, refs)),
    ]


def _pair_template_fidelity(storage: ArtifactStore, model_config: ModelConfig,
                            refs: dict[str, ArtifactRef]) -> tuple[list, str | None]:
    """Held-out pair prompts put through every hand-off, as _template_fidelity does for conversations."""
    import json

    from transformers import AutoTokenizer

    from lora_pipeline.ml import fidelity

    report_dir = storage.local_path(refs["eval_report"])
    held_out = pd.read_parquet(storage.local_path(_formatted_of(storage, report_dir)) / "eval.parquet",
                               columns=["prompt_messages", "prompt_ids"]).head(fidelity.MAX_CONVERSATIONS)
    prompts = [fidelity.HeldOutPrompt(json.loads(messages), None, [int(token) for token in ids])
               for messages, ids in zip(held_out["prompt_messages"], held_out["prompt_ids"])]
    trust = model_config.trust_remote_code
    base_tokenizer = AutoTokenizer.from_pretrained(storage.local_path(refs["quantized_base"]), trust_remote_code=trust)
    adapter_dir = storage.local_path(refs["trained_adapter"])
    adapter_tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust)
    handoffs = {
        "merged folder": fidelity.folder_ids(storage.local_path(refs["merged_model"]), trust),
        "adapter folder": fidelity.saved_tokenizer_ids(adapter_tokenizer, adapter_dir),
        "serving template": fidelity.chat_template_ids(base_tokenizer, adapter_tokenizer.chat_template),
    }
    return [fidelity.check_handoff(name, ids, prompts, base_tokenizer) for name, ids in handoffs.items()], None


def _template_fidelity(storage: ArtifactStore, model_config: ModelConfig, refs: dict[str, ArtifactRef],
                       report_dir: Path) -> tuple[list, str | None]:
    """Held-out conversations put through every hand-off (merged folder, adapter folder, the serving template)."""
    from transformers import AutoTokenizer

    from lora_pipeline.assets.data import FORMAT_SUMMARY, format_settings, stored_sources
    from lora_pipeline.assets.evaluation import EVAL_SPLIT
    from lora_pipeline.ml import fidelity
    from lora_pipeline.ml.data.templates import resolve_template

    formatted = _formatted_of(storage, report_dir)
    formatted_dir = storage.local_path(formatted)
    raw = ArtifactRef.from_entry(read_json(formatted_dir / "LINEAGE.json")["parents"]["raw_dataset"])
    dataset, trust = model_config.dataset, model_config.trust_remote_code
    base_tokenizer = AutoTokenizer.from_pretrained(storage.local_path(refs["quantized_base"]), trust_remote_code=trust)
    template = resolve_template(dataset.template, read_json(formatted_dir / FORMAT_SUMMARY)["format"],
                                base_tokenizer.chat_template)
    settings = format_settings(model_config)
    held_out = pd.read_parquet(formatted_dir / EVAL_SPLIT, columns=["content_hash", "prompt", "input_ids"])
    # A mixture's sources each with its own rows and system prompt (None: the one source).
    system_prompts = {None: dataset.system_prompt, **{source.name: source.dataset.system_prompt
                                                      for source in dataset.mixture}}
    prompts, skipped = [], []
    for name, loaded in stored_sources(storage, raw).items():
        found, not_checked = fidelity.held_out_prompts(
            loaded, held_out, base_tokenizer, template, dataset.dedupe, settings.chat_policy, system_prompts[name],
            dataset.turn_flag_field)
        prompts += found
        skipped += [f"{name}: {not_checked}" if name else not_checked] if not_checked else []
    not_checked = "; ".join(skipped) or None
    adapter_dir = storage.local_path(refs["trained_adapter"])
    adapter_tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust)
    handoffs = {
        "merged folder": fidelity.folder_ids(storage.local_path(refs["merged_model"]), trust),
        "adapter folder": fidelity.saved_tokenizer_ids(adapter_tokenizer, adapter_dir),
        # vLLM serves the adapters on the base's tokenizer, with the chat template the serving files pass
        # (serving_chat_template: the adapter's).
        "serving template": fidelity.chat_template_ids(base_tokenizer, adapter_tokenizer.chat_template),
    }
    return [fidelity.check_handoff(name, ids, prompts, base_tokenizer) for name, ids in handoffs.items()], not_checked


def serving_chat_template(adapter_dir: Path, trust_remote_code: bool = False) -> str | None:
    """The chat template the serving files pass to the server: the one training recorded in the adapter."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).chat_template


def _recommendation(storage: ArtifactStore, sweep: str) -> str | None:
    try:
        return read_json(storage.local_path(storage.current(sweep, "leaderboard")) / "leaderboard.json")["recommended"]
    except ArtifactIntegrityError:
        return None


def _against_champion(storage, device, model_config, current, candidate_version, report_dir: Path, suite: str, log):
    """The paired comparison candidate vs current champion on the suite, or None when the candidate is the champion."""
    from lora_pipeline.assets.evaluation import eval_suite
    from lora_pipeline.ml.evaluation.pipeline import compare, score_on_base

    if current.version == candidate_version:
        return None
    examples = pd.read_parquet(report_dir / EXAMPLES_FILE)
    candidate_scores = examples[examples["model"] == "adapter"].reset_index(drop=True)
    champion = current.candidate
    weights = champion["trained_adapter"].get("scores_key") or f"champion-{champion['trained_adapter']['sha256'][:16]}"
    cache = ScoreCache(storage)
    scores = cache.get(weights, suite)
    if scores is None:
        refs = {name: ArtifactRef.from_entry(entry)
                for name, entry in champion.items() if name in ("quantized_base", "trained_adapter")}
        formatted = _formatted_of(storage, report_dir)
        eval_examples, _ = eval_suite(storage, formatted, model_config.eval)
        scored, _, _ = score_on_base(storage.local_path(refs["quantized_base"]),
                                     {"champion": storage.local_path(refs["trained_adapter"])}, eval_examples, device,
                                     include_base=False, log=log, trust_remote_code=model_config.trust_remote_code)
        scores = scored["champion"]
        cache.put(weights, suite, scores)
    metric = model_config.promotion.metric
    if len(scores) != len(candidate_scores) or metric not in scores:
        raise ArtifactIntegrityError(f"champion {current.version}'s cached scores do not match suite {suite}")
    return compare(metric, "adapter", "champion", {"adapter": candidate_scores, "champion": scores},
                   model_config.eval.bootstrap_resamples, model_config.promotion.min_improvement)


def _formatted_of(storage: ArtifactStore, report_dir: Path) -> ArtifactRef:
    parent = read_json(report_dir / "LINEAGE.json")["parents"]["formatted_dataset"]
    return ArtifactRef.from_entry(parent)


GATE_CHECKS = [
    dg.AssetCheckSpec(name, asset="champion", blocking=True, description=promotion.GATE_DESCRIPTIONS[name])
    for name in (*promotion.GATES, "recommended")
]


@pipeline_asset(
    kinds={"python"}, group="decision", uses_gpu=True, code_version="1",
    reads=Reads(config=("promotion", "eval", "trust_remote_code")),
    check_specs=GATE_CHECKS,
)
def champion(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    compute: Compute,
    tracker: ExperimentTracker,
    quantized_base: ArtifactRef,
    trained_adapter: ArtifactRef,
    merged_model: ArtifactRef,
    eval_report: ArtifactRef,
):
    """The promotion decision on the newest candidate: the gates (as blocking checks), and when all pass, the
    candidate recorded as the model's champion, with its model card and vLLM serving files.

    CHAMPION.json holds the decision; README.md is the card that carries the verdict (published
    artifacts are never amended); serving/ has `serve-vllm.sh` for every champion on this base.
    A refused candidate leaves the current champion in place (`lora-pipeline rollback` restores
    an earlier one). With `tracking.report_to: [mlflow]` a promotion moves the registered model's
    alias `champion` to the candidate.
    """
    model_config = resolve_model_config(context, config, registry)
    key = context.partition_key
    owner = champion_owner(context, registry)
    sweep = owner if owner != key else None
    refs = {"quantized_base": quantized_base, "trained_adapter": trained_adapter, "merged_model": merged_model,
            "eval_report": eval_report}
    decision = decide_promotion(storage, compute.info(), model_config, key, sweep, refs, context.log.info)
    history = ChampionHistory(storage, decision.owner)
    with storage.staging_dir() as staging:
        write_json(staging / DECISION_FILE, {**decision.summary(), "suite": decision.suite,
                                             "candidate_artifacts": decision.candidate, "serving": decision.serving})
        if decision.promoted:
            _write_champion_files(staging, storage, model_config, decision, eval_report, key)
        record = stage_lineage(context, model_config, storage, refs, promoted=decision.promoted)
        ref = publish_stage(context, storage, staging, record)
    if decision.promoted and decision.current_version == decision.candidate_version:
        # Promoting the champion again changes nothing: no second history record, no alias move.
        context.log.info(f"{decision.owner}: {decision.candidate_version} is already the champion")
        tracked = {}
    elif decision.promoted:
        history.append("promote", decision.candidate_version, {**decision.candidate, "champion": {"uri": ref.uri},
                                                               "serving": decision.serving},
                       decision.suite, decision.summary()["gates"], context.run_id, key)
        context.log.info(f"{decision.owner}: {decision.candidate_version} is the champion now")
        tracked = tracker.promoted(model_config.tracking, decision.owner, storage, trained_adapter, quantized_base,
                                   model_config.trust_remote_code)
    else:
        tracked = {}
        failed = [gate.name for gate in decision.gates if not gate.passed]
        context.log.warning(f"{decision.owner}: candidate {decision.candidate_version} refused by {', '.join(failed)}; "
                            f"champion stays {decision.current_version or 'none'}")
    yield stage_output(ref, record, model_config, {
        "promoted": decision.promoted,
        "champion_of": decision.owner,
        "champion_version": decision.summary()["version"] or "none",
        "candidate_version": decision.candidate_version,
        "serving_mode": decision.serving["mode"],
        "gates": dg.MetadataValue.md(gates_table(decision.gates)),
        **tracked,
    })
    names = {gate.name for gate in decision.gates}
    for gate in decision.gates:
        yield dg.AssetCheckResult(check_name=gate.name, passed=gate.passed, description=gate.detail,
                                  severity=dg.AssetCheckSeverity.ERROR)
    if "recommended" not in names:
        yield dg.AssetCheckResult(check_name="recommended", passed=True, description="not a sweep variant")


def champion_owner(context: dg.AssetExecutionContext, registry: ModelRegistry) -> str:
    """Whose champion this partition's candidate would become: its sweep's for a sweep variant, else its own."""
    key = context.partition_key
    try:
        tags = context.run.tags
    except DagsterInvalidPropertyError:  # invoked directly, outside a run (tests, notebooks)
        tags = {}
    return tags.get(SWEEP_TAG) or _registered_sweep(registry, key) or key


def comparable_champion(storage: ArtifactStore, owner: str, base_content: str, adapter_key: str):
    """The current champion's (scores key, adapter folder, version) when it is another adapter on the same base
    (by content), so the evaluation can score it beside the candidate; else None."""
    event = ChampionHistory(storage, owner).current()
    if event is None or event.candidate["quantized_base"].get("content") != base_content:
        return None
    key = event.candidate["trained_adapter"].get("scores_key")
    if not key or key == adapter_key:
        return None
    try:
        folder = storage.local_path(ArtifactRef.from_entry(event.candidate["trained_adapter"]))
    except (ArtifactIntegrityError, FileNotFoundError):
        return None  # removed from the store since: the champion stage says so
    return key, folder, event.version


def _registered_sweep(registry: ModelRegistry, key: str) -> str | None:
    try:
        return registry.configs().sweep_of(key)
    except Exception:  # an unreadable config folder: the partition's own config was resolved already
        return None


def gates_table(gates: list[promotion.Gate]) -> str:
    """The gates as a markdown table."""
    rows = [f"| {gate.name} | {'pass' if gate.passed else '**FAIL**'} | {gate.detail.replace('|', '/')} |"
            for gate in gates]
    return "\n".join(["| gate | result | detail |", "|---|---|---|", *rows])


def _write_champion_files(staging: Path, storage: ArtifactStore, model_config: ModelConfig, decision: Decision,
                          eval_report: ArtifactRef, key: str) -> None:
    """The champion's card (the adapter's, with the evaluation and the gates) and its serving files."""
    from lora_pipeline.ml.report.modelcard import with_evaluation
    from lora_pipeline.assets.base import BASE_INFO, ORIGINAL_SUBDIR
    from lora_pipeline.ml.serving import MeasuredDrift, ServedAdapter, served_base, serving_files

    adapter_dir = storage.local_path(ArtifactRef.from_entry(decision.candidate["trained_adapter"]))
    document = read_json(storage.local_path(eval_report) / "metrics.json")
    made_by = f"eval report {decision.candidate['eval_report']['version']}"
    if model_config.preference_tuning:
        from lora_pipeline.ml.preference.report import card_section

        card = (adapter_dir / "README.md").read_text(encoding="utf-8") + card_section(document, made_by)
    else:
        card = with_evaluation((adapter_dir / "README.md").read_text(encoding="utf-8"), document, "adapter",
                               decision.owner, model_config.dataset.source_label, made_by)
    verdict = ["", "## Promotion", "", f"Champion of {decision.owner} since this decision; every gate passed:", "",
               gates_table(decision.gates), ""]
    (staging / "README.md").write_text(card + "\n".join(verdict), encoding="utf-8")
    base_content = decision.candidate["quantized_base"]["content"]
    adapters = []
    if decision.serving["mode"] == "adapter":
        adapters.append(ServedAdapter(decision.owner, decision.candidate["trained_adapter"]["uri"], decision.serving["rank"]))
    for other in _other_champions(storage, decision.owner, base_content):
        adapters.append(other)
    merged = {} if decision.serving["mode"] == "adapter" else {decision.owner: decision.candidate["merged_model"]["uri"]}
    serving_dir = staging / "serving"
    serving_dir.mkdir()
    # The adapters are served on the quantized_base they were trained against (a quantized one as stored),
    # and SERVING.md quotes eval_report's measured drift of serving anything else.
    quantized_ref = ArtifactRef.from_entry(decision.candidate["quantized_base"])
    quantized_dir = storage.local_path(quantized_ref)
    kept = (quantized_dir / ORIGINAL_SUBDIR).is_dir()
    original = f"{quantized_ref.uri.rstrip('/')}/{ORIGINAL_SUBDIR}" if kept else None
    base = served_base(model_config.base_model, quantized_ref.uri, read_json(quantized_dir / BASE_INFO), original)
    template = serving_chat_template(adapter_dir, model_config.trust_remote_code)
    for name, text in serving_files(base, adapters, merged, MeasuredDrift.from_metrics(document), template).items():
        (serving_dir / name).write_text(text, encoding="utf-8")


def _other_champions(storage: ArtifactStore, owner: str, base_content: str) -> list:
    """The other models' current champions on the same base that vLLM can serve as adapters."""
    from lora_pipeline.ml.serving import ServedAdapter

    found = []
    for model in storage.list_records("champions"):
        if model == owner:
            continue
        event = ChampionHistory(storage, model).current()
        if (event is not None and event.candidate["quantized_base"].get("content") == base_content
                and event.candidate.get("serving", {}).get("mode") == "adapter"):
            found.append(ServedAdapter(model, event.candidate["trained_adapter"]["uri"], event.candidate["serving"]["rank"]))
    return found
