"""Datasets in S3, read through s3fs from a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from lora_pipeline.errors import DataError
from lora_pipeline.ml.data.raw import load_dataset

from conftest import dataset_settings

ROWS = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(40)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_file_a_prefix_and_a_glob_in_s3_are_read(s3_bucket):
    bucket, fs = s3_bucket
    fs.pipe(f"{bucket}/one/train.jsonl", _jsonl(ROWS))
    fs.pipe(f"{bucket}/shards/part-0.jsonl", _jsonl(ROWS[:20]))
    fs.pipe(f"{bucket}/shards/part-1.jsonl", _jsonl(ROWS[20:]))
    single = load_dataset(dataset_settings(source=f"s3://{bucket}/one/train.jsonl"))
    assert single.format == "alpaca" and len(single.frame) == 40
    assert len(load_dataset(dataset_settings(source=f"s3://{bucket}/shards/")).frame) == 40
    assert len(load_dataset(dataset_settings(source=f"s3://{bucket}/shards/*.jsonl")).frame) == 40


def test_bad_rows_and_missing_keys_in_s3_are_named(s3_bucket):
    bucket, fs = s3_bucket
    fs.pipe(f"{bucket}/bad.jsonl", _jsonl(ROWS[:3]) + b'{"instruction": "x"}\n')
    with pytest.raises(DataError, match=rf"s3://{bucket}/bad.jsonl: line 4: missing field 'output'"):
        load_dataset(dataset_settings(source=f"s3://{bucket}/bad.jsonl"))
    with pytest.raises(DataError, match=rf"s3://{bucket}/nope.jsonl: dataset not found"):
        load_dataset(dataset_settings(source=f"s3://{bucket}/nope.jsonl"))


def test_the_data_stages_run_on_an_s3_source(s3_bucket, write_config, fake_resources):
    from lora_pipeline.assets import PIPELINE_CHECKS, formatted_dataset, raw_dataset

    bucket, fs = s3_bucket
    fs.pipe(f"{bucket}/chat.jsonl", _jsonl([
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)
    ]))
    write_config("micro", dataset={"source": f"s3://{bucket}/chat.jsonl", "format": "auto", "max_rows": None})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["micro"])
    result = dg.materialize([raw_dataset, formatted_dataset, *PIPELINE_CHECKS], partition_key="micro",
                            instance=instance, resources=fake_resources)
    assert result.success
    meta = result.asset_materializations_for_node("formatted_dataset")[0].metadata
    assert meta["format"].value == "messages" and meta["template"].value == "chatml"
    assert meta["train_rows"].value + meta["eval_rows"].value == 40
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 3 and all(check.passed for check in checks)
