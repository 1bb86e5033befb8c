"""Each asset called directly with build_asset_context and fake resources, in pipeline order."""

from __future__ import annotations

import json
import re

import dagster as dg
import pandas as pd
import pytest
from huggingface_hub import ModelCard

from lora_pipeline.assets import (
    eval_report,
    formatted_dataset,
    merged_model,
    quantized_base,
    raw_dataset,
    trained_adapter,
)
from lora_pipeline.config.schema import TuningRunConfig
from lora_pipeline.errors import ConfigError, DataError


@pytest.fixture
def context_for(fake_resources):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["micro", "elsewhere"])

    def build(partition: str = "micro"):
        return dg.build_asset_context(partition_key=partition, instance=instance)

    return build


def _resources(fake, *names):
    return {name: fake[name] for name in names}


@pytest.mark.slow
def test_assets_in_order_with_fake_resources(write_config, fake_resources, context_for):
    write_config("micro")
    run_config = TuningRunConfig()
    r = fake_resources

    raw = raw_dataset(context_for(), config=run_config, **_resources(r, "registry", "storage")).value
    rows = pd.read_parquet(r["storage"].local_path(raw) / "rows.parquet")
    assert len(rows) == 160

    formatted = formatted_dataset(
        context_for(), config=run_config, raw_dataset=raw, **_resources(r, "registry", "storage", "hub")
    ).value
    train = pd.read_parquet(r["storage"].local_path(formatted) / "train.parquet")
    evaluation = pd.read_parquet(r["storage"].local_path(formatted) / "eval.parquet")
    assert len(train) + len(evaluation) == 160 and not set(train["text"]) & set(evaluation["text"])

    base_output = quantized_base(context_for(), config=run_config, **_resources(r, "registry", "storage", "hub", "compute"))
    base = base_output.value
    assert base_output.metadata["quantization"].value == "nf4"
    assert base_output.metadata["quantized_layers"].value == 14  # 7 projections x 2 layers

    adapter_output = trained_adapter(
        context_for(), config=run_config, formatted_dataset=formatted, quantized_base=base,
        **_resources(r, "registry", "storage", "compute", "tracker"),
    )
    adapter = adapter_output.value
    assert adapter_output.metadata["steps"].value == 8
    # QLoRA on a CPU trains its adapter in fp32, not in the bf16 TRL casts quantized models' adapters to.
    assert adapter_output.metadata["trainable_dtype"].value == "float32"
    # The lean CPU step: own loss, padding-free batches (no padding trained), the 4-bit weights dequantized once
    # (the micro model's plan leaves room for that on any machine).
    step = adapter_output.metadata["training_step"].value
    assert step["lean_loss"] and step["padding_free"] and step["per_document_attention"] and step["dequant_cache"]
    assert adapter_output.metadata["pad_fraction"].value == 0.0
    assert adapter_output.metadata["memory_plan"].value["dequant_cache"] > 0
    assert adapter_output.metadata["loss_curve"].value.startswith("![training loss](data:image/png;base64,")
    adapter_dir = r["storage"].local_path(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "loss_curve.png"} <= {
        p.name for p in adapter_dir.iterdir()
    }

    merged_output = merged_model(
        context_for(), config=run_config, formatted_dataset=formatted, quantized_base=base, trained_adapter=adapter,
        **_resources(r, "registry", "storage", "hub"),
    )
    assert merged_output.metadata["merged_into"].value == "dequantized"
    assert merged_output.metadata["merge_fidelity_max_relative_logit_difference"].value < 1e-4

    report_output = eval_report(
        context_for(), config=run_config, formatted_dataset=formatted, quantized_base=base,
        trained_adapter=adapter, merged_model=merged_output.value,
        **_resources(r, "registry", "storage", "hub", "compute", "tracker"),
    )
    report_dir = r["storage"].local_path(report_output.value)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert "<table>" in (report_dir / "report.html").read_text() and "| adapter |" in (report_dir / "report.md").read_text()
    assert {"base", "adapter", "merged", "merged_into_original"} <= set(metrics)
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]

    # Scores per model and example; published artifacts are never amended (the champion carries the verdict).
    examples = pd.read_parquet(report_dir / "examples.parquet")
    assert set(examples["model"]) == {"base", "adapter", "merged", "merged_into_original"}
    assert {"loss", "token_accuracy", "answer", "rouge_l", "chrf"} <= set(examples.columns)
    assert {entry["verdict"] for entry in metrics["comparison"]["paired"]} <= {"better", "worse", "within noise"}
    for ref in (adapter, merged_output.value):
        assert ModelCard.load(r["storage"].local_path(ref) / "README.md").data.eval_results is None
    assert r["storage"].current("micro", "trained_adapter") == adapter


def test_run_config_sections_replace_the_files(write_config, fake_resources, context_for, tmp_path):
    write_config("micro")
    override = TuningRunConfig(dataset={"source": "/no/such/file.json"})
    with pytest.raises(DataError, match="/no/such/file.json: dataset not found"):
        raw_dataset(context_for(), config=override, **_resources(fake_resources, "registry", "storage"))
    assert not (tmp_path / "store" / "micro").exists()


def test_a_partition_without_a_file_needs_its_config_in_the_run(write_config, fake_resources, context_for):
    write_config("micro")
    with pytest.raises(ConfigError, match="model 'elsewhere' has no config file"):
        raw_dataset(context_for("elsewhere"), config=TuningRunConfig(), **_resources(fake_resources, "registry", "storage"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"bad.json: row 1: missing field 'output'"),
        ('[{"instruction": "a", "output": 7}]', r"bad.json: row 0: field 'output' must be a string"),
        ('[{"instruction": " ", "output": ""}]', r"bad.json.*: cleaning removed every row"),
        ("", r"bad.json: the dataset file is empty"),
    ],
)
def test_a_data_error_publishes_nothing(write_config, fake_resources, context_for, tmp_path, content, message):
    """raw_dataset and formatted_dataset fail with the error and leave no artifact, no staging folder."""
    write_config("micro")
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    override = TuningRunConfig(dataset={"source": str(bad)})
    try:
        raw = raw_dataset(context_for(), config=override, **_resources(fake_resources, "registry", "storage"))
    except DataError as error:
        assert re.search(message, str(error))
    else:  # rows that only cleaning rejects pass raw_dataset and fail in formatted_dataset
        with pytest.raises(DataError, match=message):
            formatted_dataset(context_for(), config=override, raw_dataset=raw.value,
                              **_resources(fake_resources, "registry", "storage", "hub"))
        assert not (tmp_path / "store" / "micro" / "formatted_dataset").exists()
        return
    store = tmp_path / "store"
    assert not (store / "micro").exists()
    assert not any((store / ".staging").iterdir()) if (store / ".staging").exists() else True


def test_the_data_checks_run_for_one_model_while_others_exist(write_config, fake_resources):
    """Checks are partitioned like their assets: other registered models do not break them."""
    from lora_pipeline.assets import PIPELINE_CHECKS, formatted_dataset, raw_dataset
    from lora_pipeline.assets.common import MODEL_PARTITIONS

    write_config("micro")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_PARTITIONS.name, ["micro", "another-model"])
    result = dg.materialize([raw_dataset, formatted_dataset, *PIPELINE_CHECKS], partition_key="micro",
                            instance=instance, resources=fake_resources, selection=["raw_dataset", "formatted_dataset"])
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 3 and all(evaluation.passed for evaluation in evaluations)
