"""A LoRA adapter trained under FSDP2 (fully_shard) on two CPU ranks with gloo is saved by rank 0 with complete
tensors, equal to the same step trained in one process, and loads back with PeftModel.from_pretrained.

Each rank is this file run as a script (`python tests/test_fsdp.py RANK PORT OUT`): no torchrun, and a rank that
fails or hangs fails the test with its output instead of blocking it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORLD = 2
R, HIDDEN, KV = 4, 64, 32  # LoRA rank; hidden size; num_key_value_heads x head_dim, v_proj's output
LAYERS, MODULES = 2, ("q_proj", "v_proj")
# Collectives give up after this (a rank waiting for a dead peer); the test kills what still runs after RUN_S.
COLLECTIVE_TIMEOUT_S, RUN_S = 60, 150


def _base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config)


def _peft_model():
    """The same LoRA model on every rank and in the test process: seeded base, seeded lora_A, and lora_B set to
    seeded non-zero values (PEFT's zeros would make q_proj's and v_proj's B, and a missing step, look alike)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=list(MODULES)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _batch():
    import torch

    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))


def _train_one_step(model) -> None:
    """One SGD step on _batch(); under FSDP2 every rank takes the same batch, so the averaged gradient is the
    one-process gradient."""
    import torch

    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()


def _rank_main(rank: int, port: int, out: Path) -> None:
    """One FSDP2 rank: shard, train a step, gather and save; what it saw goes to OUT/rank-RANK.json."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lora_pipeline.ml.training.fsdp import full_adapter_state_dict, save_full_adapter

    torch.set_num_threads(1)  # two ranks on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        model = _peft_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora = {name: parameter for name, parameter in model.named_parameters() if "lora_" in name}
        local_shapes = {name: list(parameter.to_local().shape) if isinstance(parameter, DTensor) else None
                        for name, parameter in lora.items()}
        _train_one_step(model)
        full = full_adapter_state_dict(model)
        if full:
            save_file({key: value.contiguous() for key, value in full.items()}, str(out / f"full-{rank}.safetensors"))
        wrote = save_full_adapter(model, out / f"rank-{rank}" / "adapter")
        report = {"wrote": wrote, "full_keys": len(full), "local_shapes": local_shapes}
        (out / f"rank-{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(out: Path) -> None:
    """Start the ranks, wait for all of them; a rank that fails stops the others, and the test fails with every
    rank's output."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [open(out / f"rank-{rank}.log", "w+") for rank in range(WORLD)]
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(out)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
             for rank, log in enumerate(logs)]
    deadline = time.monotonic() + RUN_S
    try:
        while any(rank.poll() is None for rank in ranks):
            failed = any(rank.poll() not in (None, 0) for rank in ranks)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
            rank.wait()
        outputs = []
        for number, (rank, log) in enumerate(zip(ranks, logs)):
            log.seek(0)
            outputs.append(f"--- rank {number} (exit {rank.returncode}) ---\n{log.read()}")
            log.close()
    assert all(rank.returncode == 0 for rank in ranks), (
        f"a rank failed or ran past {RUN_S} s:\n" + "\n".join(outputs))


def test_rank_0_saves_the_complete_adapter_trained_under_fsdp2(tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from lora_pipeline.ml.training.fsdp import full_adapter_state_dict

    _run_ranks(tmp_path)
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]
    folder = tmp_path / "rank-0" / "adapter"
    assert reports[0]["wrote"] and reports[0]["full_keys"] == LAYERS * len(MODULES) * 2
    assert not reports[1]["wrote"] and reports[1]["full_keys"] == 0 and not (tmp_path / "rank-1").exists()
    # The parameters really were sharded: each rank held half the rows of every LoRA matrix.
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert reports[0]["local_shapes"][q_a] == [R // WORLD, HIDDEN]

    saved = load_file(folder / "adapter_model.safetensors")
    assert sorted(saved) == sorted(load_file(tmp_path / "full-0.safetensors"))
    assert len(saved) == LAYERS * len(MODULES) * 2
    for key, tensor in saved.items():
        module, matrix = key.split(".")[-3:-1]
        out_features = HIDDEN if module == "q_proj" else KV
        assert tuple(tensor.shape) == ((R, HIDDEN) if matrix == "lora_A" else (out_features, R)), key
    assert all(torch.equal(saved[key], value) for key, value in load_file(tmp_path / "full-0.safetensors").items())

    with torch.random.fork_rng():
        initial = {key: value.clone() for key, value in get_peft_model_state_dict(_peft_model()).items()}
        reference = _peft_model()
        _train_one_step(reference)
        # Without a process group the one process is rank 0, and the tensors are PEFT's own.
        expected = full_adapter_state_dict(reference)
        assert expected.keys() == get_peft_model_state_dict(reference).keys()
        base = _base()
    assert expected.keys() == saved.keys()
    for key, tensor in saved.items():
        assert (tensor - initial[key]).abs().max() > 1e-4, f"{key} did not move in the step"
        torch.testing.assert_close(tensor, expected[key], atol=1e-5, rtol=0, msg=f"{key} differs from one process")

    loaded = PeftModel.from_pretrained(base, folder)
    ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
