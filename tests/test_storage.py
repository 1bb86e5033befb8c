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
