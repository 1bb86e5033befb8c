"""Per-document attention for training batches: each packed or padding-free example attends only to itself.

TRL's collator flattens a packed (or padding-free) batch into one row and marks where each example
starts (`cu_seq_lens_q`). transformers' own SDPA path turns that row into a dense block-diagonal
mask over the whole row: with ~4 examples of 256 tokens in a 1,000-token row it computes ~4x the
scores it needs and masks most of them away. Here each example runs its own causal attention over
its own tokens (varlen Flash attention on CUDA where torch has it), which is the same computation
without the discarded work.

Right-padded batches need no mask either: with causal attention a real token never sees the
padding after it, and padded positions carry no label. So no attention mask is built at all for
this implementation. It serves training batches only; `train_adapter` restores the model's own
implementation before anything else uses the model.
"""

from __future__ import annotations

import inspect

IMPLEMENTATION = "per_document"


def per_document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: causal attention within each example of the row.

    query/key/value are [batch, heads, tokens, head_dim]; returns ([batch, tokens, heads, head_dim], None)
    as transformers' own implementations do.
    """
    import torch
    import torch.nn.functional as F

    if attention_mask is not None:  # a caller that built a mask (left padding, generation): honour it
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    dropout = dropout if module.training else 0.0
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1 or boundaries.numel() <= 2:
        output = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=groups > 1
        )
        return output.transpose(1, 2).contiguous(), None
    varlen_attn = _varlen() if query.is_cuda and dropout == 0.0 else None
    if varlen_attn is not None:
        return _varlen_attention(varlen_attn, query, key, value, boundaries, kwargs.get("max_length_q"), scaling,
                                 groups), None
    # Split, not sliced: a split's backward is one concatenation of the pieces' gradients, where
    # each slice's backward fills a zero tensor the size of the whole row.
    sizes = boundaries.diff().tolist()
    pieces = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=groups > 1)
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
        if q.shape[2]
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def _varlen():
    """torch's varlen Flash attention (torch >= 2.10, CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_attention(varlen_attn, query, key, value, boundaries, longest, scaling, groups):
    import torch

    # varlen takes [tokens, heads, head_dim]; the batch is one flattened row
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))
    boundaries = boundaries.to(device=query.device, dtype=torch.int32)
    longest = int(longest) if longest is not None else int(boundaries.diff().max())
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    gqa = {"enable_gqa": True} if groups > 1 and "enable_gqa" in parameters else {}
    if groups > 1 and not gqa:
        from transformers.integrations.sdpa_attention import repeat_kv

        k = repeat_kv(key, groups)[0].transpose(0, 1)
        v = repeat_kv(value, groups)[0].transpose(0, 1)
    output = varlen_attn(q, k, v, boundaries, boundaries, longest, longest, scale=scaling, **causal, **gqa)
    return output.unsqueeze(0)


def use_per_document_attention(model) -> str:
    """Switch model (and its sub-models) to per-document attention; return the implementation it had."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, per_document_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    return previous


def restore_attention(model, previous: str) -> None:
    """Give the model back the attention implementation it was loaded with."""
    model.set_attn_implementation(previous)
