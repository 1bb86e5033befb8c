"""A cache of the dequantized 4-bit weights for QLoRA training, when memory has room for it.

bitsandbytes dequantizes every 4-bit weight in each forward pass and again in the backward pass
(to form the input gradient): on a CPU that is about 8% of a QLoRA step. The frozen weights never
change during training, so dequantizing each once, before the first step, and reusing it gives
bit-for-bit the same products (the same kernels run on the same dequantized values) at the cost of
holding the weights in the compute dtype. The 4-bit weights stay where they are: the saved adapter,
the merge and the evaluation see the same quantized base as without the cache.
"""

from __future__ import annotations

import types


def quantized_linears(model) -> list:
    """The model's bitsandbytes 4-bit linear layers."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def cache_dequantized_weights(model) -> int:
    """Dequantize each 4-bit weight once and make its layer use that copy; return the bytes held.

    Must run before the first forward pass: on a CPU, bitsandbytes re-lays out 4-bit weights for
    inference on the first no-grad forward, after which dequantizing them gives wrong values.
    """
    import bitsandbytes as bnb

    held = 0
    for module in quantized_linears(model):
        state = module.weight.quant_state
        dtype = module.compute_dtype or state.dtype
        weight = bnb.functional.dequantize_4bit(module.weight.data, state).to(dtype)
        module.dequantized_weight = weight.detach()
        module.forward = types.MethodType(_forward_with_cached_weight, module)
        held += weight.numel() * weight.element_size()
    return held


def _forward_with_cached_weight(self, x):
    """bitsandbytes' Linear4bit.forward with the dequantization done once beforehand."""
    import torch.nn.functional as F

    weight = self.dequantized_weight
    bias = self.bias.to(weight.dtype) if self.bias is not None else None
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
