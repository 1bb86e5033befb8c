"""Saving a LoRA adapter trained under FSDP2 (`torch.distributed.fsdp.fully_shard`). Dagster-free; torch imported
lazily.

Under FSDP2 every parameter is a DTensor holding only this rank's shard (a row block of each lora_A / lora_B), so
`peft_model.save_pretrained(dir)` on rank 0 would write rank 0's shards: an adapter with the wrong shapes that no
base loads. The functions here gather the complete tensors with torch's distributed state-dict API
(`get_model_state_dict` with `full_state_dict` and `cpu_offload`: each DTensor is all-gathered, and only rank 0
keeps the result, on the CPU) and let PEFT pick the adapter's entries, as it does for an unsharded model.

Only trainable parameters are gathered (`ignore_frozen_params`): the frozen base is the bulk of the model, and
gathering it would put the whole base in rank 0's memory for nothing. The one PEFT entry that comes from a frozen
weight, a targeted or resized embedding layer that `save_embedding_layers` copies into the adapter, is therefore
not in the result; an embedding trained through `modules_to_save` is trainable and is.

Both functions are collectives: every rank must call them, in the same order, or the ranks that did wait in the
all-gather until the process group's timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Wrapper modules whose name torch's state-dict API leaves out of the keys it returns (DDP's `module`, FSDP1's
# wrapped module, torch.compile's original module, activation checkpointing's wrapped module), see
# torch.distributed.checkpoint.state_dict._get_fqns.
_DDP_PREFIX = "module"
_FSDP1_PREFIX = "_fsdp_wrapped_module"
_COMPILED_PREFIX = "_orig_mod"
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module"


def full_adapter_state_dict(model, adapter_name: str = "default") -> dict[str, "torch.Tensor"]:
    """The adapter `adapter_name` of the PEFT model in `model` (a PeftModel, or a module containing exactly one,
    e.g. the FSDP/DDP root), as complete CPU tensors keyed as `peft.get_peft_model_state_dict` keys them
    (`base_model.model....q_proj.lora_A.weight`, no adapter name): what an adapter_model.safetensors holds.

    Works whether the parameters are FSDP2 DTensors, plain tensors with a process group (e.g. DDP replicas), or
    plain tensors without one. Rank 0 gets the tensors, the other ranks `{}`; without a process group the one
    process is rank 0. Collective: every rank must call it.
    """
    from peft import get_peft_model_state_dict

    peft_model, gathered = _gathered_trainable_state_dict(model)
    if gathered is None:
        return {}
    return get_peft_model_state_dict(peft_model, state_dict=gathered, adapter_name=adapter_name)


def save_full_adapter(peft_model, out_dir: "str | Path") -> bool:
    """Write the PEFT model's adapters to `out_dir` from rank 0, with complete tensors, as `save_pretrained` does
    (adapter_config.json and adapter_model.safetensors; other adapters in their sub-folders).

    `peft_model` is the PeftModel or a module containing exactly one; pass the FSDP root when the root is a
    wrapper, so that the gather covers every sharded module. Returns True on rank 0 (it wrote), False on the others
    (nothing written). Collective: every rank must call it. The other ranks do not wait for rank 0's write.
    """
    peft, gathered = _gathered_trainable_state_dict(peft_model)
    if gathered is None:
        return False
    # save_pretrained runs `state_dict` through get_peft_model_state_dict itself, once per adapter it saves, so it
    # gets the model-keyed entries (adapter names in the keys), not full_adapter_state_dict's output: that one has
    # lost the adapter names, and with several adapters PEFT 0.21.2 would save each with the first one's weights.
    peft.save_pretrained(str(out_dir), state_dict=gathered, safe_serialization=True)
    return True


def _gathered_trainable_state_dict(model):
    """(the PeftModel in `model`, its trainable parameters as complete CPU tensors keyed as `PeftModel.state_dict()`
    keys them); the dict is None on ranks other than 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    peft_model, prefix = _find_peft_model(model)
    distributed = dist.is_available() and dist.is_initialized()
    # cpu_offload with full_state_dict makes the gather rank-0-only (the other ranks get {}) once a process group
    # exists; without one, every process is rank 0 of its own run and gets everything.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if distributed and dist.get_rank() != 0:
        return peft_model, None
    gathered = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # trainable parameters outside the PEFT model are not the adapter's
        # Unsharded CPU parameters come back as views of the live parameters (offloading to the CPU is then a
        # no-op): copy them, so the result does not change with the next optimizer step.
        gathered[key[len(prefix):]] = value.detach().clone()
    return peft_model, gathered


def _find_peft_model(model):
    """(the one PeftModel in `model`, the prefix of its parameters in the keys torch's state-dict API returns)."""
    from peft import PeftModel

    found = [(name, module) for name, module in model.named_modules() if isinstance(module, PeftModel)]
    if len(found) != 1:
        raise ValueError(f"expected one PEFT model in {type(model).__name__}, found {len(found)}"
                         + (f" ({', '.join(name or '<root>' for name, _ in found)})" if found else ""))
    name, peft_model = found[0]
    return peft_model, _state_dict_prefix(model, name)


def _state_dict_prefix(model, name: str) -> str:
    """The prefix of submodule `name`'s entries in get_model_state_dict(model): its path without the wrapper
    names the API drops."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    parts, module = [], model
    for part in name.split(".") if name else []:
        dropped = (part == _DDP_PREFIX and isinstance(module, DistributedDataParallel)) or part in (
            _FSDP1_PREFIX, _CHECKPOINT_PREFIX) or (part == _COMPILED_PREFIX and isinstance(
                module, torch._dynamo.eval_frame.OptimizedModule))
        module = getattr(module, part)
        if not dropped:
            parts.append(part)
    return "".join(f"{part}." for part in parts)
