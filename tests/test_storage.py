"""The artifact store: atomic publish, pointers, verification, a remote (memory://) backend."""

from __future__ import annotations

import json

import pytest

from lora_pipeline.resources.storage import ArtifactIntegrityError, ArtifactStore


def _write(folder, files):
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)


def test_publish_then_read_back(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    with store.staging_dir() as staging:
        _write(staging, {"a.txt": "hello", "sub/b.txt": "world"})
        ref = store.publish(staging, "micro", "raw_dataset")
    assert store.current("micro", "raw_dataset") == ref
    local = store.local_path(ref)
    assert (local / "sub" / "b.txt").read_text() == "world"
    manifest = json.loads((local / "MANIFEST.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "sub/b.txt"]
    assert ref.files == 2 and ref.size_bytes == 10
    assert not any((tmp_path / "store" / ".staging").iterdir())


def test_identical_content_publishes_to_the_same_version(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    refs = []
    for _ in range(2):
        with store.staging_dir() as staging:
            _write(staging, {"a.txt": "same"})
            refs.append(store.publish(staging, "micro", "raw_dataset"))
    assert refs[0] == refs[1]


def test_a_failed_writer_leaves_nothing_published(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    with pytest.raises(RuntimeError):
        with store.staging_dir() as staging:
            _write(staging, {"half.txt": "partial"})
            raise RuntimeError("killed mid-write")
    assert not (tmp_path / "store" / "micro").exists()
    assert not any((tmp_path / "store" / ".staging").iterdir())
    with pytest.raises(ArtifactIntegrityError, match="materialize it first"):
        store.current("micro", "raw_dataset")


def test_a_truncated_file_is_detected(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    with store.staging_dir() as staging:
        _write(staging, {"weights.bin": "0123456789"})
        ref = store.publish(staging, "micro", "quantized_base")
    (store.local_path(ref) / "weights.bin").write_text("01234")
    with pytest.raises(ArtifactIntegrityError, match="weights.bin is missing or has the wrong size"):
        store.local_path(ref)


def test_remote_filesystem_roundtrip_through_the_local_cache(tmp_path):
    store = ArtifactStore(root="memory://lora-test/store", cache_dir=str(tmp_path / "cache"))
    with store.staging_dir() as staging:
        _write(staging, {"rows.parquet": "data", "nested/x.json": "{}"})
        ref = store.publish(staging, "micro", "raw_dataset")
    assert ref.uri.startswith("memory://")
    assert store.current("micro", "raw_dataset") == ref
    local = store.local_path(ref)
    assert local.is_relative_to(tmp_path / "cache")
    assert (local / "nested" / "x.json").read_text() == "{}"


def test_a_corrupted_file_of_the_same_size_is_detected(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    with store.staging_dir() as staging:
        _write(staging, {"weights.bin": "0123456789"})
        ref = store.publish(staging, "micro", "quantized_base")
    folder = tmp_path / "store" / "micro" / "quantized_base" / ref.sha256[:16]
    (folder / "weights.bin").write_text("0123456780")  # one flipped byte, same size
    with pytest.raises(ArtifactIntegrityError, match="weights.bin does not match its sha256"):
        store.local_path(ref)


def test_stale_staging_folders_of_killed_writers_are_removed(tmp_path):
    import os
    import time

    store = ArtifactStore(root=str(tmp_path / "store"))
    with store.staging_dir():
        pass
    stale = tmp_path / "store" / ".staging" / "dead-writer"
    stale.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(stale, (day_ago, day_ago))
    fresh = tmp_path / "store" / ".staging" / "running-writer"
    fresh.mkdir()
    with store.staging_dir():
        pass
    assert not stale.exists() and fresh.exists()


def test_on_s3_the_manifest_is_uploaded_last_and_a_partial_upload_is_not_published(s3_bucket, tmp_path):
    """A writer that dies after some files: the version has no manifest, readers refuse it, a retry completes it."""
    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    with store.staging_dir() as staging:
        _write(staging, {"a.bin": "A" * 1000, "b.bin": "B" * 1000})
        ref = store.publish(staging, "micro", "merged_model")
    version = f"{bucket}/store/micro/merged_model/{ref.sha256[:16]}"
    fs.rm(f"{version}/MANIFEST.json")
    fs.rm(f"{version}/b.bin")  # as if the writer died after a.bin
    fs.invalidate_cache()
    with pytest.raises(ArtifactIntegrityError, match="never fully published"):
        store.local_path(ref)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with store.staging_dir() as staging:
        _write(staging, {"a.bin": "A" * 1000, "b.bin": "B" * 1000})
        assert store.publish(staging, "micro", "merged_model") == ref
    assert (store.local_path(ref) / "b.bin").read_text() == "B" * 1000


def test_a_corrupted_object_in_s3_is_refused_on_download(s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    with store.staging_dir() as staging:
        _write(staging, {"weights.bin": "0123456789"})
        ref = store.publish(staging, "micro", "trained_adapter")
    fs.pipe(f"{bucket}/store/micro/trained_adapter/{ref.sha256[:16]}/weights.bin", b"9123456789")
    with pytest.raises(ArtifactIntegrityError, match="weights.bin does not match its sha256"):
        store.local_path(ref)
    assert not any((tmp_path / "cache").iterdir())  # nothing corrupted entered the cache


WRITER = """
import sys
from pathlib import Path
from lora_pipeline.resources.storage import ArtifactStore
store = ArtifactStore(root=sys.argv[1], cache_dir=sys.argv[2])
with store.staging_dir() as staging:
    for index in range(6):
        (staging / f"shard-{index}.bin").write_bytes(bytes([index]) * (16 << 20))
    store.publish(staging, "micro", "merged_model")
"""


def test_a_writer_killed_mid_upload_leaves_no_published_artifact(s3_bucket, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    bucket, fs = s3_bucket
    root = f"s3://{bucket}/store"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, root, str(tmp_path / "writer-cache")])
    deadline = time.time() + 120
    uploaded = []
    while time.time() < deadline and writer.poll() is None:
        fs.invalidate_cache()
        uploaded = [p for p in fs.find(f"{bucket}/store/micro/merged_model") if p.endswith(".bin")]
        if uploaded:
            break
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert uploaded, "the writer finished or failed before the test could kill it mid-upload"
    fs.invalidate_cache()
    left = fs.find(f"{bucket}/store/micro/merged_model")
    assert left and not any(p.endswith("MANIFEST.json") or p.endswith("CURRENT.json") for p in left)
    store = ArtifactStore(root=root, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ArtifactIntegrityError, match="materialize it first"):
        store.current("micro", "merged_model")


@pytest.mark.parametrize("partition", ["../escape", "a/b", "/abs", ".hidden", ""])
def test_names_that_could_leave_the_store_are_refused(tmp_path, partition):
    store = ArtifactStore(root=str(tmp_path / "store"))
    with store.staging_dir() as staging:
        _write(staging, {"a.txt": "x"})
        with pytest.raises(ArtifactIntegrityError, match="refusing a path outside the store"):
            store.publish(staging, partition, "raw_dataset")
    with pytest.raises(ArtifactIntegrityError, match="refusing a path outside the store"):
        store.current(partition, "raw_dataset")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a").exists()


def test_a_manifest_naming_a_file_outside_the_artifact_is_refused(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    (tmp_path / "secret.txt").write_text("x")
    with store.staging_dir() as staging:
        _write(staging, {"a.txt": "x"})
        ref = store.publish(staging, "micro", "raw_dataset")
    folder = tmp_path / "store" / "micro" / "raw_dataset" / ref.sha256[:16]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    manifest["files"].append({"path": "../../../../secret.txt", "size": 1, "sha256": "0" * 64})
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    import hashlib

    forged = ref.__class__(uri=ref.uri, sha256=hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
                           size_bytes=ref.size_bytes, files=2)
    with pytest.raises(ArtifactIntegrityError, match="outside the artifact"):
        store.local_path(forged)


def test_s3_credentials_come_from_the_aws_variables_through_envvar_and_never_show(s3_bucket, tmp_path, monkeypatch):
    import dagster as dg

    from lora_pipeline.resources.factory import default_resources

    bucket, _ = s3_bucket
    endpoint = __import__("os").environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    store = default_resources(storage_root=f"s3://{bucket}/store")["storage"]
    assert store.aws_secret_access_key == dg.EnvVar("AWS_SECRET_ACCESS_KEY")  # a name, resolved at run time
    assert store.aws_session_token is None  # unset variables are left to s3fs, not passed as EnvVars that fail
    # The fields reach s3fs: with the variables gone, only they can find the server and sign requests.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    explicit = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"),
                             aws_access_key_id="testing", aws_secret_access_key="testing", endpoint_url=endpoint)
    with explicit.staging_dir() as staging:
        _write(staging, {"a.txt": "hello"})
        ref = explicit.publish(staging, "micro", "raw_dataset")
    assert (explicit.local_path(ref) / "a.txt").read_text() == "hello"
    assert "testing" not in repr(explicit)


def test_on_s3_uploads_abandoned_by_killed_writers_are_removed_by_the_next_publish(s3_bucket, tmp_path, monkeypatch):
    from lora_pipeline.resources import storage as storage_module

    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    with store.staging_dir() as staging:
        _write(staging, {"kept.txt": "published"})
        kept = store.publish(staging, "micro", "merged_model")
    abandoned = f"{bucket}/store/micro/merged_model/0123456789abcdef"
    fs.pipe_file(f"{abandoned}/model.safetensors", b"half an upload")
    with store.staging_dir() as staging:  # a recent leftover may be a writer still at work: kept
        _write(staging, {"next.txt": "one"})
        store.publish(staging, "micro", "merged_model")
    fs.invalidate_cache()
    assert fs.exists(abandoned)
    monkeypatch.setattr(storage_module, "STALE_STAGING_SECONDS", -60)  # as if a day had passed
    with store.staging_dir() as staging:
        _write(staging, {"next.txt": "two"})
        store.publish(staging, "micro", "merged_model")
    fs.invalidate_cache()
    assert not fs.exists(abandoned)
    assert (store.local_path(kept) / "kept.txt").read_text() == "published"  # published versions stay


def _published_model(store):
    with store.staging_dir() as staging:
        _write(staging, {"README.md": "# card as trained\n", "weights.bin": "0123456789"})
        return store.publish(staging, "micro", "trained_adapter")


def _hashed_afresh(store, ref):
    from lora_pipeline.resources import storage

    storage._HASHED.clear()  # a new process hashes every file again
    return store.local_path(ref)


def test_a_card_an_earlier_version_amended_still_verifies_and_nothing_else_does(tmp_path):
    import hashlib

    store = ArtifactStore(root=str(tmp_path / "store"))
    ref = _published_model(store)
    local = store.local_path(ref)
    amended = b"# card with evaluation\n"
    # What lora-pipeline wrote before published artifacts became immutable: the card and its hash in CARD.json.
    (local / "CARD.json").write_text(json.dumps({"cards": [{"sha256": hashlib.sha256(amended).hexdigest(),
                                                             "size": len(amended), "amended_by": "eval_report 0123"}]}))
    (local / "README.md").write_bytes(amended)
    _hashed_afresh(store, ref)
    (local / "README.md").write_text("# card with evaluatioN\n")  # same size, other bytes
    with pytest.raises(ArtifactIntegrityError, match="README.md does not match its sha256"):
        _hashed_afresh(store, ref)
    (local / "README.md").write_text("# card as trained\n")
    (local / "weights.bin").write_text("9123456789")  # weights were never amendable
    with pytest.raises(ArtifactIntegrityError, match="weights.bin does not match its sha256"):
        _hashed_afresh(store, ref)


def test_champion_records_on_s3_are_shared_by_every_reader(s3_bucket, tmp_path):
    from lora_pipeline.resources.records import ChampionHistory

    bucket, _ = s3_bucket
    writer = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "cache"))
    ChampionHistory(writer, "demo").append("promote", "aaaa", {}, "suite", {}, "run", "demo")
    ChampionHistory(writer, "demo").append("promote", "bbbb", {}, "suite", {}, "run", "demo")
    reader = ArtifactStore(root=f"s3://{bucket}/store", cache_dir=str(tmp_path / "elsewhere"))
    assert ChampionHistory(reader, "demo").current().version == "bbbb"
    assert ChampionHistory(reader, "demo").rollback(None).version == "aaaa"
    assert ChampionHistory(writer, "demo").current().version == "aaaa"
    assert reader.list_records("champions") == ["demo"]


def test_the_content_digest_is_what_an_artifact_holds_not_who_made_it(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))

    def publish(lineage, data="rows"):
        with store.staging_dir() as staging:
            _write(staging, {"LINEAGE.json": lineage, "train.parquet": data, "eval.parquet": "held out"})
            return store.publish(staging, "micro", "formatted_dataset")

    first, second = publish('{"run": "a"}'), publish('{"run": "b"}')
    assert first.sha256 != second.sha256  # two versions...
    assert store.content_digest(first) == store.content_digest(second)  # ...of the same content
    assert store.content_digest(publish('{"run": "c"}', data="other rows")) != store.content_digest(first)
    assert store.content_digest(first, only=("train.parquet",)) != store.content_digest(first)
    with pytest.raises(ArtifactIntegrityError, match="has no missing.parquet"):
        store.content_digest(first, only=("missing.parquet",))
