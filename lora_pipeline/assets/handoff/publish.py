"""The published_model stage: a model's champion uploaded to a Hugging Face Hub repo, on demand.

Publishing is a hand-off a person asks for, never a step of the `tune` job, its sensors or its
schedules: materialize published_model in the UI (or launch the `publish` job), or run
`lora-pipeline run CONFIG --select published_model`. It publishes only what the champion stage
promoted: when the model's newest decision refused its candidate, or the champion was rolled back
since, it refuses and says why. The repo gets the adapter with the champion's model card and,
with publish.include_merged, the merged model in merged/; the store keeps PUBLISHED.json (repo,
commit, files) and the card as uploaded.
"""

import tempfile
from pathlib import Path
from typing import Iterator

import dagster as dg

from lora_pipeline.assets.champion import DECISION_FILE
from lora_pipeline.assets.common import config_metadata, read_json, ref_metadata, resolve_model_config, write_json
from lora_pipeline.assets.handoff import handoff_asset, not_requested
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.errors import ConfigError, PublishError
from lora_pipeline.ml.publishing import CARD_FILE, MERGED_FOLDER, assemble_upload, default_commit_message
from lora_pipeline.ml.report.modelcard import hub_card
from lora_pipeline.resources.publishing import ModelPublisher
from lora_pipeline.resources.records import ChampionHistory
from lora_pipeline.resources.registry import ModelRegistry
from lora_pipeline.resources.storage import ArtifactRef, ArtifactStore

PUBLISHED_FILE = "PUBLISHED.json"


@handoff_asset(kinds={"huggingface"})
def published_model(
    context: dg.AssetExecutionContext,
    config: TuningRunConfig,
    registry: ModelRegistry,
    storage: ArtifactStore,
    publisher: ModelPublisher,
    champion: ArtifactRef,
) -> Iterator[dg.Output[ArtifactRef]]:
    """The model's champion on the Hugging Face Hub (on demand, never part of the tune job): its adapter with the
    champion's model card, and with publish.include_merged its merged model in merged/, committed to publish.repo_id
    (private by default) at publish.revision. Refuses a candidate the champion stage did not promote. The token is
    $HF_TOKEN; the metadata links the commit."""
    if (skipped := not_requested(context)) is not None:
        context.log.info(skipped)
        return
    model_config = resolve_model_config(context, config, registry)
    settings = model_config.publish
    if settings.repo_id is None:
        raise ConfigError("publish.repo_id is not set: name the Hub repo to publish to in the model's config "
                          "(publish: {repo_id: user-or-org/name}) or in the run config")
    key = context.partition_key
    decision, adapter, merged = promoted_champion(storage, champion, key)
    card = hub_card((storage.local_path(champion) / CARD_FILE).read_text(encoding="utf-8"), model_config.base_model,
                    settings.repo_id, settings.revision, MERGED_FOLDER if settings.include_merged else None)
    message = settings.commit_message or default_commit_message(decision["model"], decision["version"])
    facts = {"repo_id": settings.repo_id, "revision": settings.revision, "private": settings.private,
             "includes_merged": settings.include_merged, "champion_of": decision["model"],
             "champion_version": decision["version"], "commit_message": message}
    with storage.writer_lock(key, context.asset_key.path[-1], context.run_id):
        with tempfile.TemporaryDirectory(prefix="lora-pipeline-publish-") as folder:
            files = assemble_upload(Path(folder), storage.local_path(adapter), card,
                                    storage.local_path(merged) if settings.include_merged else None)
            context.log.info(f"publishing champion {decision['version']} of {decision['model']} to "
                             f"{settings.repo_id}@{settings.revision}: {len(files)} files")
            publication = publisher.publish(Path(folder), settings.repo_id, private=settings.private,
                                            revision=settings.revision, commit_message=message)
        ref = _keep_record(storage, key, context.asset_key.path[-1], {**publication.as_dict(), **facts}, card)
    context.log.info(f"published: {publication.commit_url}")
    yield dg.Output(ref, data_version=dg.DataVersion(publication.commit_oid), metadata={
        **ref_metadata(ref), **config_metadata(model_config), **facts,
        "repo_url": dg.MetadataValue.url(publication.repo_url),
        "commit_url": dg.MetadataValue.url(publication.commit_url),
        "commit_oid": publication.commit_oid,
        "uploaded_files": publication.files,
    })


def _keep_record(storage: ArtifactStore, key: str, asset: str, record: dict, card: str) -> ArtifactRef:
    """What was published, in the store: PUBLISHED.json and the card as uploaded (the weights are the champion's)."""
    with storage.staging_dir() as staging:
        write_json(staging / PUBLISHED_FILE, record)
        (staging / CARD_FILE).write_text(card, encoding="utf-8")
        return storage.publish(staging, key, asset)


def promoted_champion(storage: ArtifactStore, champion: ArtifactRef, key: str) -> tuple[dict, ArtifactRef, ArtifactRef]:
    """The champion stage's newest decision for model `key` and the adapter and merged model it promoted, when that
    candidate is still the current champion; else a PublishError that says why nothing is published."""
    decision = read_json(storage.local_path(champion) / DECISION_FILE)
    if not decision["promoted"]:
        failed = [name for name, gate in decision["gates"].items() if not gate["passed"]]
        raise PublishError(
            f"model {key}: the champion stage refused candidate {decision['candidate']} (failed: {', '.join(failed)}), "
            f"so nothing is published; publish once a candidate passes the gates "
            f"(`lora-pipeline promote CONFIG --dry-run` explains them)")
    current = ChampionHistory(storage, decision["model"]).current()
    if current is None or current.version != decision["candidate"]:
        now = current.version if current is not None else "none"
        raise PublishError(
            f"model {key}: the champion of {decision['model']} is {now} now, not {decision['candidate']} that the "
            f"champion stage promoted last (rolled back since?); publishing follows the champion stage's newest "
            f"promotion: promote the model again, then publish")
    artifacts = decision["candidate_artifacts"]
    return (decision, ArtifactRef.from_entry(artifacts["trained_adapter"]),
            ArtifactRef.from_entry(artifacts["merged_model"]))


# On-demand stages: in the graph after the stage they hand off, outside the tune job (assets/__init__.py).
ON_DEMAND_ASSETS = [published_model]
