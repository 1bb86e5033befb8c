"""The whole graph materialized on the CPU, QLoRA (NF4) and plain LoRA; outputs load with plain HF code."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch

from lora_pipeline.assets import PIPELINE_ASSETS, PIPELINE_CHECKS
from lora_pipeline.definitions import defs


def _materialize(fake_resources, partition="micro", also=(), instance=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", [partition])
    result = dg.materialize([*PIPELINE_ASSETS, *also, *PIPELINE_CHECKS], partition_key=partition, instance=instance,
                            resources=fake_resources)
    assert result.success
    refs = {
        name: result.asset_materializations_for_node(name)[0].metadata["uri"].value
        for name in [a.key.path[-1] for a in PIPELINE_ASSETS]
    }
    return result, refs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8", "none"])
def test_whole_graph_materializes_and_outputs_load_with_plain_hf_code(write_config, fake_resources, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.assets import gguf_export

    # Every asset at once, as the UI's "Materialize all" does: the on-demand export, configured, is not run.
    write_config("micro", quantization={"mode": mode}, export={"gguf": "q8_0"})
    instance = dg.DagsterInstance.ephemeral()
    result, uris = _materialize(fake_resources, also=[gguf_export], instance=instance)
    assert not result.asset_materializations_for_node("gguf_export")
    said = [entry.user_message for entry in instance.all_logs(result.run_id) if entry.step_key == "gguf_export"]
    assert any("gguf_export runs on demand only, and this run also materializes other stages" in m for m in said)

    metrics = json.loads(open(f"{uris['eval_report']}/metrics.json").read())
    for model in ("base", "adapter", "merged"):
        assert {"loss", "perplexity", "token_accuracy"} <= set(metrics[model])
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
    assert abs(metrics["merged"]["loss"] - metrics["adapter"]["loss"]) / metrics["adapter"]["loss"] < 0.01
    assert ("merged_into_original" in metrics) == (mode != "none")

    # A user's own code: the adapter on the quantized base, and the merged model, with no project code.
    base = AutoModelForCausalLM.from_pretrained(uris["quantized_base"])
    with_adapter = PeftModel.from_pretrained(base, uris["trained_adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(uris["merged_model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(uris["merged_model"])
    ids = tokenizer("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, m = with_adapter(ids).logits, merged(ids).logits
    tolerance = 1e-4 if mode == "none" else 5e-2  # 4-bit kernels vs dequantized float32 weights
    assert float((a - m).abs().max() / a.abs().max()) < tolerance
    assert not list(merged.named_modules()) or all("lora" not in n for n, _ in merged.named_modules())


def test_definitions_load_with_the_stages_the_leaderboard_the_checks_the_jobs_and_the_sensor():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    stages = ["raw_dataset", "formatted_dataset", "quantized_base", "trained_adapter", "merged_model", "eval_report",
              "champion"]
    assert {key for key in graph.materializable_asset_keys} == {
        dg.AssetKey(stage) for stage in [*stages, "leaderboard", "published_model", "gguf_export"]}
    assert {key for key in graph.external_asset_keys} == {dg.AssetKey(f"{stage}_settings") for stage in stages}
    checks = {(key.asset_key.path[-1], key.name) for key in graph.asset_check_keys}
    gates = {("champion", name) for name in ("better_than_base", "no_regression", "forgetting", "merge_fidelity",
                                             "servable", "template_fidelity", "recommended")}
    assert checks == {("raw_dataset", "rows_match_format"), ("formatted_dataset", "examples_are_trainable"),
                      ("formatted_dataset", "train_eval_disjoint"), *gates}
    job = defs.resolve_job_def("tune")
    assert {key.name for key in job.asset_layer.asset_graph.asset_check_keys} >= {name for _, name in checks}
    assert dg.AssetKey("published_model") not in job.asset_layer.asset_graph.get_all_asset_keys()  # on demand only
    assert defs.resolve_sensor_def("model_configs") is not None


def test_config_sensor_adds_a_partition_per_new_file(write_config, fake_resources):
    from lora_pipeline.sensors import model_configs

    write_config("alpha")
    write_config("beta")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("models", ["alpha"])
    result = model_configs(dg.build_sensor_context(instance=instance), registry=fake_resources["registry"])
    assert [request.partition_keys for request in result.dynamic_partitions_requests] == [["beta"]]


@pytest.mark.slow
def test_a_hub_id_base_resolves_through_the_hub_and_merges_into_its_originals(write_config, fake_resources, micro_base):
    """The non-built-in path: base_model is a hub id, served offline by LocalModelHub."""
    from lora_pipeline.resources import LocalModelHub

    fake_resources["hub"] = LocalModelHub(cache_dir=str(micro_base.parent / "unused"), models={"acme/micro": str(micro_base)})
    write_config("micro", base_model="acme/micro", merge={"base_weights": "original"})
    result, uris = _materialize(fake_resources)
    merged_meta = result.asset_materializations_for_node("merged_model")[0].metadata
    assert merged_meta["merged_into"].value == "original"
    assert merged_meta["merge_fidelity_max_relative_logit_difference"].value < 1e-4
    assert not (Path(uris["quantized_base"]) / "original").exists()  # hub bases stay in the hub cache
    adapter_config = json.loads((Path(uris["trained_adapter"]) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/micro"


@pytest.mark.slow
def test_the_real_alpaca_sample_runs_through_the_whole_graph(write_config, fake_resources):
    from conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the shared data folder must sit beside the project checkout")
    # Real answers are long (median ~250 tokens with the micro model's 1k vocabulary): a quarter
    # exceed 512 tokens, so the limit on over-long examples is raised for this data.
    write_config("micro", dataset={"source": str(SHARED_DATA), "format": "auto", "max_rows": None,
                                   "max_truncation_rate": 0.3}, training={"max_length": 512})
    result, uris = _materialize(fake_resources)
    formatted = result.asset_materializations_for_node("formatted_dataset")[0].metadata
    assert formatted["rows_in"].value == 999 and formatted["format"].value == "alpaca"
    started = [event.step_key for event in result.all_events if event.event_type_value == "STEP_START"]
    assert started.index("formatted_dataset") < started.index("quantized_base")  # bad data fails before any model loads
    assert all(check.passed for check in result.get_asset_check_evaluations())
    metrics = json.loads(open(f"{uris['eval_report']}/metrics.json").read())
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]


@pytest.mark.slow
def test_a_multi_turn_chat_dataset_trains_and_is_evaluated_with_its_template(tmp_path, write_config, fake_resources):
    rows = [
        {"conversations": [{"from": "system", "value": "Answer with a number."},
                           {"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"{2 * i}"},
                           {"from": "human", "value": "And times two?"}, {"from": "gpt", "value": f"{4 * i}"}]}
        for i in range(120)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_config("micro", dataset={"source": str(data), "format": "auto", "max_rows": None, "eval_fraction": 0.2},
                 training={"max_length": 256})
    result, uris = _materialize(fake_resources)
    formatted = result.asset_materializations_for_node("formatted_dataset")[0].metadata
    assert (formatted["format"].value, formatted["template"].value) == ("sharegpt", "chatml")
    samples = json.loads(open(f"{uris['eval_report']}/samples.json").read())
    assert samples and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    assert all(s["reference"].endswith("<|im_end|></s>") for s in samples)


@pytest.mark.slow
def test_the_whole_graph_runs_on_an_s3_store(s3_bucket, write_config, fake_resources, tmp_path):
    """The artifact store on S3 (moto's server on 127.0.0.1): every artifact published there with its manifest."""
    from lora_pipeline.assets.common import ARTIFACT_IO
    from lora_pipeline.resources import ArtifactRefIOManager, ArtifactStore

    bucket, fs = s3_bucket
    store = ArtifactStore(root=f"s3://{bucket}/lora", cache_dir=str(tmp_path / "s3-cache"))
    fake_resources.update({"storage": store, ARTIFACT_IO: ArtifactRefIOManager(store=store)})
    write_config("micro", quantization={"mode": "none"}, training={"max_steps": 4})
    _, uris = _materialize(fake_resources)
    for name, uri in uris.items():
        assert uri.startswith(f"s3://{bucket}/lora/micro/{name}/")
        assert fs.exists(f"{uri.removeprefix('s3://')}/MANIFEST.json")
    metrics = json.loads((store.local_path(store.current("micro", "eval_report")) / "metrics.json").read_text())
    assert metrics["adapter"]["loss"] < metrics["base"]["loss"]
