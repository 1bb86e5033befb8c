"""Choosing what to ship, without models: metrics on known strings, intervals, gates, the champion history,
serving checks, sweep configs and the leaderboard's recommendation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lora_pipeline.ml.scoring.paired import mean_interval, paired_bootstrap
from lora_pipeline.ml.scoring.text import normalize_answer, text_scores


def test_text_metrics_on_known_strings():
    scores = text_scores(["The cat.", "a b c d", "", "x"], ["cat", "a b x d", "", "y"])
    assert scores["exact_match"] == [0.0, 0.0, 1.0, 0.0]
    assert scores["normalized_match"] == [1.0, 0.0, 1.0, 0.0]
    # LCS of "a b c d" and "a b x d" is 3 tokens of 4: precision = recall = F1 = 0.75.
    assert scores["rouge_l"][1] == pytest.approx(0.75)
    assert scores["rouge_l"][2] == 1.0 and scores["chrf"][2] == 1.0
    assert text_scores(["same words here"], ["same words here"])["chrf"] == [pytest.approx(1.0)]
    assert text_scores(["qqqq"], ["zzzz"])["chrf"][0] < 0.05
    # rouge-score's own tokenizer drops non-Latin text: ours keeps its words.
    assert text_scores(["Привет мир"], ["привет мир"], ["rouge_l"])["rouge_l"] == [pytest.approx(1.0)]
    assert normalize_answer("  The  Answer: 42! ") == "answer 42"
    with pytest.raises(ValueError, match="bleu"):
        text_scores(["a"], ["a"], ["bleu"])


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    truth, covered, runs = 0.3, 0, 300
    for run in range(runs):
        reference = rng.normal(1.0, 1.0, 60)
        candidate = reference + truth + rng.normal(0.0, 0.5, 60)
        low, high = paired_bootstrap("m", "c", "r", candidate, reference, resamples=1000, seed=run).difference.as_dict()["ci95"]
        covered += low <= truth <= high
    assert 0.90 <= covered / runs <= 0.99
    assert mean_interval([2.0]).as_dict() == {"value": 2.0, "ci95": [2.0, 2.0]}


def test_no_better_claim_inside_the_noise():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.5, 0.2, 80)
    noisy = reference + rng.normal(0.002, 0.1, 80)
    assert paired_bootstrap("rouge_l", "a", "b", noisy, reference).verdict(0.0) == "within noise"
    clear = paired_bootstrap("rouge_l", "a", "b", reference + 0.2 + rng.normal(0, 0.02, 80), reference)
    assert clear.verdict(0.0) == "better" and "better by more than" in clear.sentence(0.0)
    assert clear.verdict(0.5) == "within noise"  # a margin larger than the difference: no claim
    assert paired_bootstrap("rouge_l", "b", "a", reference, reference + 0.2).verdict(0.0) == "worse"
    # loss: lower is better, so a lower candidate wins.
    loss = paired_bootstrap("loss", "a", "b", reference - 0.3, reference, higher_is_better=False)
    assert loss.verdict(0.0) == "better" and loss.wins == 80 and loss.losses == 0


def test_wins_ties_and_losses_are_counted_per_example():
    comparison = paired_bootstrap("m", "a", "b", [1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1])
    assert (comparison.wins, comparison.ties, comparison.losses) == (2, 1, 1)
    with pytest.raises(ValueError, match="3 a values vs 2 b values"):
        paired_bootstrap("m", "a", "b", [1, 2, 3], [1, 2])


def test_servability_and_serving_files(tmp_path):
    from peft import LoraConfig

    from lora_pipeline.ml.serving import ServedAdapter, max_lora_rank_for, read_servability, serving_files, servability

    assert servability({"r": 16, "bias": "none", "modules_to_save": None}).mode == "adapter"
    assert servability({"r": 8, "use_dora": True}).mode == "merged-only"
    assert servability({"r": 8, "bias": "all"}).mode == "merged-only"
    assert servability({"r": 8, "rank_pattern": {"q_proj": 96}}).rank == 96
    LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]).save_pretrained(tmp_path)
    merged_only = read_servability(tmp_path)
    assert not merged_only.servable and "lm_head" in merged_only.reasons[0]
    assert max_lora_rank_for([4, 16]) == 16 and max_lora_rank_for([20]) == 32
    with pytest.raises(ValueError):
        max_lora_rank_for([600])
    files = serving_files("meta-llama/Llama-3.1-8B", [ServedAdapter("a", "/s/a", 8), ServedAdapter("b", "/s b", 32)])
    script = files["serve-vllm.sh"]
    assert "--enable-lora" in script and "a=/s/a" in script and "'b=/s b'" in script
    assert "--max-lora-rank 32" in script and "--max-loras 2" in script
    assert [m["name"] for m in json.loads(files["lora-modules.json"])] == ["a", "b"]
    merged = serving_files("base", [], {"demo": "/s/merged"})["serve-vllm.sh"]
    assert "--enable-lora" not in merged and "vllm serve /s/merged" in merged
    for text in (script, merged):
        (tmp_path / "serve.sh").write_text(text)
        subprocess.run(["bash", "-n", str(tmp_path / "serve.sh")], check=True)


def _document(adapter_loss_shift: float = -1.0, forgetting: float = 0.05, drift: float = 0.001) -> dict:
    from lora_pipeline.ml.evaluation.pipeline import compare

    base = np.linspace(2.0, 3.0, 40)
    frames = {"base": _frame(base), "adapter": _frame(base + adapter_loss_shift + np.linspace(-0.05, 0.05, 40))}
    return {"comparison": {"paired": [compare("loss", "adapter", "base", frames, 500, 0.0)],
                           "forgetting": {"relative_change": forgetting, "base_loss": 3.0,
                                          "adapter_loss": 3.0 * (1 + forgetting)},
                           "merged_vs_adapter_loss_change": drift, "merge_weights": "dequantized"}}


def _frame(values):
    import pandas as pd

    return pd.DataFrame({"loss": values})


def test_gates_follow_the_config():
    from lora_pipeline.config.schema import PromotionSettings
    from lora_pipeline.ml import promotion
    from lora_pipeline.ml.serving import Servability

    settings = PromotionSettings()
    assert promotion.better_than_base(_document(), settings).passed
    assert not promotion.better_than_base(_document(adapter_loss_shift=0.0), settings).passed
    assert not promotion.better_than_base(_document(), PromotionSettings(min_improvement=2.0)).passed
    assert not promotion.forgetting(_document(forgetting=0.4), settings).passed
    assert not promotion.merge_fidelity(_document(drift=0.05), settings).passed
    merged_only = Servability(False, 16, ("modules_to_save ['lm_head'] are trained in full",))
    assert promotion.servable(merged_only, settings).passed
    refused = promotion.servable(merged_only, PromotionSettings(serving="adapter"))
    assert not refused.passed and "lm_head" in refused.detail
    worse = {"difference": {"value": 0.3}, "higher_is_better": False, "sentence": "s"}
    assert not promotion.no_regression(worse, settings, "v1").passed
    assert promotion.no_regression(worse, PromotionSettings(max_regression=0.5), "v1").passed
    assert promotion.no_regression(None, settings, None).passed


def test_champion_history_is_append_only_and_rolls_back(tmp_path):
    from lora_pipeline.errors import ConfigError
    from lora_pipeline.resources.records import ChampionHistory, ScoreCache
    from lora_pipeline.resources.storage import ArtifactStore

    store = ArtifactStore(root=str(tmp_path / "store"))
    history = ChampionHistory(store, "demo")
    assert history.current() is None
    with pytest.raises(ConfigError, match="no champion"):
        history.rollback(None)
    adapters = {}
    for version in ("aaaa1111", "bbbb2222", "cccc3333"):
        folder = tmp_path / version
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_text(version)
        ref = store.publish(folder, "demo", "trained_adapter")
        adapters[version] = {"uri": ref.uri, "sha256": ref.sha256}
        history.append("promote", version, {"trained_adapter": adapters[version]}, "suite", {}, "run", "demo")
    assert history.current().version == "cccc3333"
    assert history.rollback(None).version == "bbbb2222"
    assert history.rollback("aaaa").version == "aaaa1111"
    with pytest.raises(ConfigError, match="never had champion 'dddd'.*aaaa1111"):
        history.rollback("dddd")
    for prefix in ("", " "):  # an empty prefix would match any champion
        with pytest.raises(ConfigError, match="at least 4 characters"):
            history.rollback(prefix)
    assert [event.action for event in history.events()] == ["promote"] * 3 + ["rollback"] * 2
    assert len(store.list_records("champions/demo")) == 5  # one file per event, none rewritten

    # A forged record (pointing outside the store) or a damaged artifact is refused before anything moves.
    history.append("promote", "eeee5555", {"trained_adapter": {"uri": "/etc", "sha256": "0" * 64}}, "suite", {},
                   "run", "demo")
    history.append("promote", "ffff6666", {"trained_adapter": adapters["bbbb2222"]}, "suite", {}, "run", "demo")
    with pytest.raises(ConfigError, match="eeee5555 of 'demo' cannot be restored.*outside the store"):
        history.rollback("eeee")
    Path(adapters["cccc3333"]["uri"], "adapter_model.safetensors").write_text("tampered")
    with pytest.raises(ConfigError, match="cccc3333 of 'demo' cannot be restored.*does not match"):
        history.rollback("cccc")
    assert history.current().version == "ffff6666"

    cache = ScoreCache(store)
    assert cache.get("weights", "suite") is None
    cache.put("weights", "suite", _frame([1.0, 2.0]))
    assert cache.get("weights", "suite")["loss"].tolist() == [1.0, 2.0]


def test_a_sweep_file_is_one_partition_per_variant(tmp_path, write_config):
    import yaml

    from lora_pipeline.config.registry import ConfigRegistry, load_config_file, load_sweep_file
    from lora_pipeline.errors import ConfigError

    path = write_config("ranks")
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "sweep": {"lora.r": [4, 8], "quantization.mode": ["nf4", "none"]}}))
    variants = load_sweep_file(path)
    assert list(variants) == ["ranks.r4.mode-nf4", "ranks.r4.mode-none", "ranks.r8.mode-nf4", "ranks.r8.mode-none"]
    assert variants["ranks.r8.mode-none"].lora.r == 8 and variants["ranks.r8.mode-none"].quantization.mode == "none"
    registry = ConfigRegistry(path.parent)
    assert registry.variants_of("ranks") == list(variants) and registry.sweep_of("ranks.r4.mode-nf4") == "ranks"
    assert registry.load("ranks.r4.mode-none").quantization.mode == "none"
    with pytest.raises(ConfigError, match="sweep file"):
        load_config_file(path)
    path.write_text(yaml.safe_dump({**data, "sweep": {"lora.rank": [4]}}))
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        load_sweep_file(path)
    path.write_text(yaml.safe_dump({**data, "sweep": {"lora.r": [4, 8]},
                                    "blends": [{"name": "mix", "weights": {"ranks.r4": 1, "ranks.r9": 1}}]}))
    with pytest.raises(ConfigError, match="'ranks.r9' is not a variant of this sweep"):
        load_sweep_file(path)
    path.write_text(yaml.safe_dump({**data, "sweep": {"lora.r": 4}}))
    with pytest.raises(ConfigError, match="'sweep.lora.r' must be a non-empty list"):
        load_sweep_file(path)


def test_a_new_option_at_its_default_leaves_existing_versions_alone():
    from conftest import micro_config_data
    from lora_pipeline.assets.provenance import stage_versions
    from lora_pipeline.config.schema import ModelConfig

    plain = ModelConfig.model_validate(micro_config_data())
    dora = ModelConfig.model_validate(micro_config_data(lora={"use_dora": True}))
    before = stage_versions(plain, "source")
    after = stage_versions(dora, "source")
    assert before["quantized_base"] == after["quantized_base"] and before["trained_adapter"] != after["trained_adapter"]
    from lora_pipeline.assets.stages import pipeline

    assert "use_dora" not in pipeline()["trained_adapter"].reads.of(plain)["lora"]


def test_the_leaderboard_recommends_the_smallest_variant_within_noise(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_pipeline.ml.report.leaderboard import Variant, build_leaderboard, leaderboard_png, pareto_front

    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, 50)
    variants = []
    for rank, shift, seconds in ((4, 0.001, 10.0), (16, 0.0, 12.0), (64, 0.3, 20.0)):
        folder = tmp_path / f"r{rank}"
        folder.mkdir()
        save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(rank, 32),
                   "base_model.model.q_proj.lora_B.weight": torch.zeros(32, rank),
                   "base_model.model.lm_head.weight": torch.zeros(100, 32)}, folder / "adapter_model.safetensors")
        losses = base + shift + rng.normal(0, 0.01, 50)
        variants.append(Variant(f"s.r{rank}", {"lora.r": rank}, folder, _frame(losses),
                                {"loss": mean_interval(losses).as_dict()}, seconds, 100.0, "suite"))
    board = build_leaderboard(variants, "loss", 0.0, 500)
    rows = {row["partition"]: row for row in board["rows"]}
    assert rows["s.r4"]["lora_parameters"] == 4 * 64 and rows["s.r4"]["modules_to_save_parameters"] == 3200
    assert board["best"] == "s.r16" and rows["s.r64"]["vs_best"]["verdict"] == "worse"
    assert board["recommended"] == "s.r4"  # within noise of the best, and the smallest
    assert "s.r64" not in board["pareto_parameters"]
    assert leaderboard_png(board)[:4] == b"\x89PNG"
    assert pareto_front({"a": (1, 1), "b": (2, 2), "c": (3, 0)}) == ["a", "c"]


def test_the_compute_front_does_not_move_when_the_machine_is_busy(tmp_path):
    """Two variants that did the same arithmetic: one trained while the machine did other work (3x its wall time).
    The time front says the other is cheaper; the compute front, estimated from tokens and parameters, does not."""
    import torch
    from safetensors.torch import save_file

    from lora_pipeline.ml.report.leaderboard import Variant, build_leaderboard, leaderboard_markdown, training_flops

    summary = {"train_tokens": 10_000, "total_parameters": 1_000_000, "trainable_parameters": 5_000,
               "gradient_checkpointing": False}
    assert training_flops(summary) == 10_000 * (4 * 1_000_000 + 2 * 5_000)
    assert training_flops({**summary, "gradient_checkpointing": True}) == 10_000 * (6 * 1_000_000 + 2 * 5_000)
    rng = np.random.default_rng(1)
    losses = rng.normal(2.0, 0.3, 50)
    variants = []
    for name, seconds, shift in (("quiet", 10.0, 0.02), ("busy", 30.0, 0.0)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 32)}, folder / "adapter_model.safetensors")
        variants.append(Variant(name, {}, folder, _frame(losses + shift), {"loss": mean_interval(losses + shift).as_dict()},
                                seconds, 100.0, "suite", train_flops=training_flops(summary)))
    board = build_leaderboard(variants, "loss", 0.0, 500)
    assert board["pareto_time"] == ["quiet", "busy"]  # wall time: 'quiet' looks three times cheaper
    assert board["pareto_compute"] == ["busy"]  # the same work: only the better one is on the front
    assert "train TFLOP" in leaderboard_markdown(board, "s")


def test_seeds_in_a_sweep_set_the_noise_floor(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lora_pipeline.ml.report.leaderboard import Variant, build_leaderboard

    rng = np.random.default_rng(3)
    base = rng.normal(2.0, 0.3, 40)
    variants = []
    for rank, seed, shift in ((4, 0, 0.00), (4, 1, 0.08), (16, 0, -0.05), (16, 1, 0.02)):
        folder = tmp_path / f"r{rank}s{seed}"
        folder.mkdir()
        save_file({"m.q_proj.lora_A.weight": torch.zeros(rank, 8)}, folder / "adapter_model.safetensors")
        losses = base + shift + rng.normal(0, 0.005, 40)
        variants.append(Variant(f"s.r{rank}.seed{seed}", {"lora.r": rank, "training.seed": seed}, folder,
                                _frame(losses), {"loss": mean_interval(losses).as_dict()}, 1.0, 1.0, "suite"))
    board = build_leaderboard(variants, "loss", 0.0, 500)
    assert board["seed_noise"]["floor"] == pytest.approx(0.08, abs=0.01) and board["seed_noise"]["groups"] == 2
    assert board["margin"] == board["seed_noise"]["floor"]  # a rank change smaller than the seeds' spread is noise
    assert board["best"] == "s.r16.seed0" and board["recommended"] == "s.r4.seed0"
