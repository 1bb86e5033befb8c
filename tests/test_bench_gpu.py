"""bench/gpu on a CPU: its result lines parse back into the reported table, and its MFU arithmetic is right by hand.

The GPU bench itself runs on a lent GPU machine (bench/gpu/README.md); these check the parts that decide what
it reports, with no torch and in well under a second.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench" / "gpu"))

import flop_count  # noqa: E402
import result_table  # noqa: E402

# Two layers of a small grouped-query Llama: hidden 64, 4 heads of 16 (q 64), 2 KV heads (kv 32), MLP 128.
SMALL = flop_count.LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100)


def test_matmul_parameters_count_every_projection_and_the_head_but_not_the_embedding():
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down = 36,864
    assert flop_count.matmul_parameters(SMALL) == 2 * per_layer + 100 * 64 == 80_128


def test_lora_flops_by_hand_and_the_6n_ratio():
    flops = flop_count.lora_flops(SMALL, rank=8, document_lengths=[32, 32])
    # frozen: forward 2N + input gradient 2N
    assert flops.frozen == 4 * 80_128 == 320_512
    # adapters: 6 r (in + out) per projection: q 128, k 96, v 96, o 128, gate 192, up 192, down 192 = 1,024
    assert flops.adapters == 6 * 8 * 1_024 * 2 == 98_304
    # attention: 6 L q_dim S (forward 4 q S, backward 8 q S, causal halves), S = 32
    assert flops.attention == 6 * 2 * 64 * 32 == 24_576
    assert flops.per_token == 443_392
    assert flops.six_n == 480_768
    assert flops.six_n_over_honest == pytest.approx(480_768 / 443_392)  # 1.084: adapters and attention narrow it
    assert flops.six_n / flops.frozen == 1.5  # on the matmul term alone 6N overstates LoRA by exactly 1.5x


def test_attention_over_packed_documents_weights_each_token_by_its_own_document():
    # one 96-token and one 32-token document: S_eff = (96^2 + 32^2) / 128 = 80, not the row's 128
    assert flop_count.effective_context([96, 32]) == 80
    assert flop_count.attention_flops(SMALL, [96, 32]) == 6 * 2 * 64 * 80


def test_llama_8b_shape_counts():
    shape = flop_count.LlamaShape.from_config({"hidden_size": 4096, "intermediate_size": 14336,
                                               "num_hidden_layers": 32, "num_attention_heads": 32,
                                               "num_key_value_heads": 8, "vocab_size": 128256})
    # Llama-3.1-8B: 8,030,261,248 parameters less the embedding (525M) and the norms (266,240)
    assert flop_count.matmul_parameters(shape) == 8_030_261_248 - 128256 * 4096 - 65 * 4096


def test_mfu_against_the_peak():
    # 5e9 FLOP/token at 100,000 tokens/s is 500 TFLOP/s: half of a 1,000 TFLOP/s peak
    assert flop_count.mfu(5e9, 100_000, peak_tflops=1000) == pytest.approx(0.5)


def test_steady_tokens_per_second_leaves_out_the_warmup_steps():
    # step 1 slow (compilation), then one step per second
    times = [(1, 10.0), (2, 11.0), (3, 12.0), (4, 13.0), (5, 14.0)]
    assert flop_count.steady_tokens_per_second(times, tokens_per_step=1000, warmup_steps=2) == pytest.approx(1000)
    assert flop_count.steady_tokens_per_second(times[:1], 1000, 2) == 0.0


SAMPLE_OUTPUT = """\
=== environment (up to 555 s)
Some library warning {"not": "ours"}
{"bench": "lora-gpu", "part": "environment", "status": "ok", "device_name": "NVIDIA H200", "bf16_matmul_tflops": 788.4, "versions": {"torch": "2.11.0+cu130", "transformers": "5.17.0", "trl": "1.16.0", "bitsandbytes": "0.50.2"}}
{"bench": "lora-gpu", "part": "demo", "status": "ok", "tokens_per_s": 41000.5, "train_s": 12.3, "peak_gib": 0.5, "plan_allocated_gib": 0.4, "peak_over_plan": 1.25}
{"bench": "lora-gpu", "part": "qlora8b-build", "status": "ok", "micro_batch": 32}
{"bench": "lora-gpu", "part": "qlora8b", "variant": "baseline", "status": "ok", "compat": ["transformers 5.17.0: SFTConfig bridged"], "steady_tokens_per_s": 52000, "mfu": 0.3062, "mfu_6n": 0.4409, "micro_batch": 32, "train_s": 20.0, "peak_gib": 90.5, "plan_allocated_gib": 89.6, "peak_over_plan": 1.01}
{"bench": "lora-gpu", "part": "qlora8b", "variant": "per_document", "status": "skipped", "reason": "the config schema has no training.attention"}
{"bench": "lora-gpu", "part": "qlora8b", "variant": "liger", "status": "failed", "error": "OutOfMemoryError: CUDA out of memory", "oom": true}
{"bench": "lora-gpu", "part": "qlora8b", "variant": "all", "status": "ok",
"""


def test_parse_result_lines_keeps_only_the_tagged_json_records():
    records = result_table.parse_result_lines(SAMPLE_OUTPUT)
    assert [(r["part"], r.get("variant")) for r in records] == [
        ("environment", None), ("demo", None), ("qlora8b-build", None), ("qlora8b", "baseline"),
        ("qlora8b", "per_document"), ("qlora8b", "liger")]  # the broken last line is dropped


def test_summary_table_reports_each_part_with_its_figures():
    table = result_table.summary_table(result_table.parse_result_lines(SAMPLE_OUTPUT))
    lines = table.splitlines()
    assert lines[0].startswith("NVIDIA H200, bf16 matmul 788 TFLOP/s measured; torch 2.11.0+cu130")
    assert lines[1].split() == ["part", "status", "tokens/s", "MFU", "MFU", "6N", "batch", "train", "s", "peak", "GiB",
                                "plan", "GiB", "peak/plan", "note"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if line.split() and ":" in line.split()[0]
            or line.startswith("demo")}
    assert rows["demo"][:3] == ["demo", "ok", "41,000"]  # no steady rate: the overall one
    assert rows["qlora8b:baseline"][:9] == ["qlora8b:baseline", "ok", "52,000", "30.6%", "44.1%", "32", "20.0",
                                            "90.50", "89.60"]
    assert "the config schema has no training.attention" in table
    assert "OutOfMemoryError" in table
    assert "qlora8b-build" not in table  # build and environment records that went well stay in the JSON
    failed_build = {"bench": "lora-gpu", "part": "qlora8b-build", "status": "skipped", "reason": "time budget"}
    assert "qlora8b-build  skipped" in result_table.summary_table([failed_build])
    assert lines.count("compat: transformers 5.17.0: SFTConfig bridged") == 1
    assert "overstates LoRA's matmul work by 1.5x" in lines[-1]


def test_results_document_and_result_line_round_trip():
    record = result_table.with_derived({"part": "demo", "status": "ok", "peak_gib": 3.0, "plan_allocated_gib": 2.0})
    assert record["peak_over_plan"] == 1.5
    assert result_table.parse_result_lines([result_table.result_line(record)]) == [{"bench": "lora-gpu", **record}]
    document = result_table.results_document(result_table.parse_result_lines(SAMPLE_OUTPUT))
    assert document["environment"]["device_name"] == "NVIDIA H200"
    assert len(document["results"]) == 5
    json.dumps(document)


def test_gpu_bench_help_and_tiny_defaults():
    import gpu_bench

    args = gpu_bench.parse_args(["--tiny", "--steps", "6"])
    assert (args.layers, args.seq_len, args.micro_batch, args.steps) == (2, 128, 2, 6)  # explicit --steps kept
    assert "training.max_steps=4" in args.demo_overrides
    defaults = gpu_bench.parse_args([])
    assert (defaults.layers, defaults.seq_len, defaults.micro_batch, defaults.peak_tflops) == (4, 2048, 0, 989.0)
