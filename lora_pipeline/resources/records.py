"""Small records kept in the artifact store beside the artifacts: cached evaluation scores and champion histories.

Both live in the store (a folder or S3) so that every machine sharing a store shares them:
evaluation scores are cached by (weights, suite), so comparing again recomputes nothing; a
model's champion history is append-only, one file per event, because an object store cannot
append to a file and a rewritten history could lose an event two writers made at once.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_pipeline.errors import ConfigError
from lora_pipeline.resources.artifacts import ArtifactIntegrityError, ArtifactRef

if TYPE_CHECKING:
    import pandas as pd

    from lora_pipeline.resources.storage import ArtifactStore


class ScoreCache:
    """Per-example scores of some weights on an eval suite, keyed by (weights digest, suite digest)."""

    def __init__(self, storage: "ArtifactStore") -> None:
        self.storage = storage

    def get(self, weights: str, suite: str) -> "pd.DataFrame | None":
        """The cached scores, or None."""
        import pandas as pd

        payload = self.storage.get_record(f"scores/{suite}/{weights}.parquet")
        return pd.read_parquet(io.BytesIO(payload)) if payload is not None else None

    def put(self, weights: str, suite: str, scores: "pd.DataFrame") -> None:
        """Cache the scores."""
        buffer = io.BytesIO()
        scores.to_parquet(buffer, index=False)
        self.storage.put_record(f"scores/{suite}/{weights}.parquet", buffer.getvalue())


@dataclass(frozen=True)
class ChampionEvent:
    """One entry of a champion history: a promotion or a rollback, and the champion it made current."""

    sequence: int
    action: str  # "promote" or "rollback"
    version: str  # the champion's trained_adapter version (its artifact version)
    candidate: dict  # {asset: {"uri", "sha256", "version"}} of what was promoted
    suite: str
    gates: dict
    at: str
    run_id: str | None
    partition: str
    note: str = ""

    def as_dict(self) -> dict:
        """The event as stored."""
        return dict(vars(self))


class ChampionHistory:
    """A model's champions, newest last, in the store under _records/champions/<model>/."""

    def __init__(self, storage: "ArtifactStore", model: str) -> None:
        self.storage = storage
        self.model = model

    def events(self) -> list[ChampionEvent]:
        """Every promotion and rollback, oldest first."""
        found = []
        for name in self.storage.list_records(f"champions/{self.model}"):
            payload = self.storage.get_record(f"champions/{self.model}/{name}")
            if payload is not None and name.endswith(".json"):
                found.append(ChampionEvent(**json.loads(payload)))
        return sorted(found, key=lambda event: event.sequence)

    def current(self) -> ChampionEvent | None:
        """The current champion: the newest event's."""
        events = self.events()
        return events[-1] if events else None

    def append(self, action: str, version: str, candidate: dict, suite: str, gates: dict, run_id: str | None,
               partition: str, note: str = "") -> ChampionEvent:
        """Record a promotion or rollback as a new file (never rewriting an earlier one)."""
        events = self.events()
        event = ChampionEvent(
            sequence=(events[-1].sequence + 1) if events else 1, action=action, version=version, candidate=candidate,
            suite=suite, gates=gates, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), run_id=run_id,
            partition=partition, note=note,
        )
        path = f"champions/{self.model}/{event.sequence:06d}.json"
        if self.storage.get_record(path) is not None:
            raise ConfigError(f"champion history of {self.model!r} changed while writing; try again")
        self.storage.put_record(path, json.dumps(event.as_dict(), indent=1, sort_keys=True).encode())
        return event

    def _verify(self, event: "ChampionEvent") -> None:
        """Every artifact a champion record names is inside the store and matches its manifest and recorded digest."""
        for name, entry in event.candidate.items():
            if not isinstance(entry, dict) or "uri" not in entry or "sha256" not in entry:
                continue  # not an artifact (a record's own facts)
            ref = ArtifactRef.from_entry(entry)
            try:
                self.storage.local_path(ref)
            except ArtifactIntegrityError as exc:
                raise ConfigError(f"champion {event.version} of {self.model!r} cannot be restored: its {name} "
                                  f"does not check out ({exc})") from None

    def rollback(self, to_version: str | None, run_id: str | None = None) -> ChampionEvent:
        """Make an earlier champion current again: the one with `to_version`, or the one before the current."""
        promotions = [event for event in self.events() if event.action == "promote"]
        current = self.current()
        if current is None:
            raise ConfigError(f"model {self.model!r} has no champion to roll back")
        if to_version is None:
            earlier = [event for event in promotions if event.version != current.version]
            if not earlier:
                raise ConfigError(f"model {self.model!r} has had no champion before {current.version}")
            target = earlier[-1]
        else:
            to_version = to_version.strip()
            known = ", ".join(dict.fromkeys(event.version for event in promotions)) or "none"
            if len(to_version) < 4:  # an empty or tiny prefix would match any champion
                raise ConfigError(f"--to {to_version!r}: give at least 4 characters of a champion version; "
                                  f"model {self.model!r}'s champions: {known}")
            matches = {event.version: event for event in promotions if event.version.startswith(to_version)}
            if not matches:
                raise ConfigError(f"model {self.model!r} never had champion {to_version!r}; its champions: {known}")
            if len(matches) > 1:
                raise ConfigError(f"--to {to_version!r} matches several champions ({', '.join(matches)}): give more of it")
            target = next(iter(matches.values()))
        self._verify(target)  # before anything moves: a forged or damaged record is refused here
        return self.append("rollback", target.version, target.candidate, target.suite, target.gates, run_id,
                           target.partition, note=f"rolled back from {current.version}")
