"""Where published_model sends a champion: the Hugging Face Hub, or a local folder standing in for it.

ModelPublisher is the interface; HubPublisher uploads with huggingface_hub (the real one, its
token from $HF_TOKEN through dg.EnvVar in the deployment's resources); FolderPublisher keeps each
commit in a folder (tests, and dry runs on machines without a Hub).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from lora_pipeline.errors import PublishError

TOKEN_VARIABLE = "HF_TOKEN"
ENDPOINT_VARIABLE = "HF_ENDPOINT"
DEFAULT_BRANCH = "main"


@dataclass(frozen=True)
class Publication:
    """One upload, as the Hub answered it."""

    repo_url: str
    commit_url: str
    commit_oid: str
    revision: str
    files: list[str]

    def as_dict(self) -> dict:
        """The publication as plain data (PUBLISHED.json)."""
        return asdict(self)


class ModelPublisher(dg.ConfigurableResource):
    """Uploads a prepared folder as one commit to a model repo; the interface of the publishers."""

    def publish(self, folder: Path, repo_id: str, *, private: bool, revision: str,
                commit_message: str) -> Publication:
        """Create the repo if missing (private or not), then commit every file of `folder` to `revision`."""
        raise NotImplementedError


class HubPublisher(ModelPublisher):
    """The Hugging Face Hub (or a server speaking its API, such as a self-hosted Hub)."""

    token: Optional[str] = Field(
        default=None,
        description="Hub access token with write access. Set from $HF_TOKEN (a dg.EnvVar, so it never appears in "
        "code or run config); unset: publishing refuses, naming HF_TOKEN.",
    )
    endpoint: Optional[str] = Field(
        default=None,
        description="URL of the Hub. Unset: $HF_ENDPOINT, else https://huggingface.co.",
    )

    def publish(self, folder: Path, repo_id: str, *, private: bool, revision: str,
                commit_message: str) -> Publication:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if not self.token:
            raise PublishError(f"{TOKEN_VARIABLE} is not set: publishing to the Hub needs a token with write access "
                               f"(export {TOKEN_VARIABLE}=hf_... where Dagster or `lora-pipeline` runs, then reload)")
        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != DEFAULT_BRANCH:  # the Hub commits only to existing branches
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=commit_message)
        except OfflineModeIsEnabled as exc:
            raise PublishError(f"cannot publish {repo_id}: HF_HUB_OFFLINE is set (unset it to reach the Hub)") from exc
        except HfHubHTTPError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PublishError(f"the Hub refused publishing to {repo_id}: {detail}") from exc
        return Publication(repo_url=str(repo_url), commit_url=commit.commit_url, commit_oid=commit.oid,
                           revision=revision, files=_files_of(folder))


class FolderPublisher(ModelPublisher):
    """A Hub kept in a folder: each commit is copied to ROOT/REPO_ID/commits/OID and listed in ROOT/REPO_ID/log.json."""

    root: str = Field(description="Folder holding the published repos.")

    def publish(self, folder: Path, repo_id: str, *, private: bool, revision: str,
                commit_message: str) -> Publication:
        repo = Path(self.root).resolve() / repo_id
        log_path = repo / "log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {"private": private, "commits": []}
        files = _files_of(folder)
        digest = hashlib.sha1()
        for name in files:
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
        oid = digest.hexdigest()
        shutil.copytree(folder, repo / "commits" / oid, dirs_exist_ok=True)
        log["commits"].append({"oid": oid, "revision": revision, "message": commit_message, "files": files,
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        log_path.write_text(json.dumps(log, indent=1))
        return Publication(repo_url=repo.as_uri(), commit_url=(repo / "commits" / oid).as_uri(), commit_oid=oid,
                           revision=revision, files=files)


def _files_of(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
