"""One LoRA dropout mask per layer input, shared by the adapters that read that input.

PEFT gives each adapted projection its own dropout, so a Llama block draws seven masks although
q/k/v read the same hidden states, and gate/up the same normalised residual: each draws and
applies a mask over the same [tokens, hidden] tensor. Sharing the mask among the adapters that read
one tensor keeps each adapter's dropout rate (every adapter still sees its input zeroed with
probability p and scaled by 1/(1-p)) and halves the work; it changes which elements are dropped
together, so losses match PEFT's in expectation, not bit for bit.
"""

from __future__ import annotations

import weakref


def _dropout_module_class():
    import torch

    class SharedInputDropout(torch.nn.Module):
        """Dropout that returns the same dropped tensor when it is called again on the very same input."""

        def __init__(self, p: float):
            super().__init__()
            self.dropout = torch.nn.Dropout(p)
            self.last = None  # (weak reference to the input, its version, the dropped tensor)

        def forward(self, x):
            if self.training and self.last is not None:
                source, version, dropped = self.last
                if source() is x and x._version == version:
                    return dropped
            dropped = self.dropout(x)
            self.last = (weakref.ref(x), x._version, dropped) if self.training and torch.is_grad_enabled() else None
            return dropped

        def forget(self) -> None:
            self.last = None

    return SharedInputDropout


def share_dropout_masks(model) -> int:
    """Give the LoRA layers under each parent module (an attention block, an MLP) one shared dropout; return how many.

    A shared dropout reuses its mask only for the identical input tensor, so adapters of one parent
    that read different inputs (o_proj, down_proj) still draw their own.
    """
    import torch

    SharedInputDropout = _dropout_module_class()
    shared: dict[tuple[str, str, float], torch.nn.Module] = {}
    for name, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        parent = name.rsplit(".", 1)[0]
        for adapter, dropout in list(dropouts.items()):
            if not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0:
                continue
            key = (parent, adapter, dropout.p)
            if key not in shared:
                shared[key] = SharedInputDropout(dropout.p)
            dropouts[adapter] = shared[key]
    if shared:
        # The last dropped tensors are released when a forward pass ends, not kept until the next one.
        modules = list(shared.values())

        def forget_dropped(*_) -> None:  # a forward hook that returned something would replace the output
            for module in modules:
                module.forget()

        model.register_forward_hook(forget_dropped)
    return len(shared)
