"""Padding-free training forwards: a batch's rows packed into one sequence, attention kept within each row.

Why: on a CPU the time of a training step follows the token positions it computes. trl's preference trainers
(DPO, ORPO, KTO, SimPO) pad every batch to its longest row: on the default cell's DPO pairs a third of the positions
are padding (trl 1.16 turned DPO's own `padding_free` off). And transformers runs a packed sequence through SDPA
with a block-diagonal mask over all N positions: N² work where the rows need Σ nᵢ², which on a batch of eight rows
took a third of a step (`benchmarks/padding.py`).

Two pieces, used only while a trainer trains (`training._run`):
- `varlen_attention(model)`: while it is active, a packed sequence (one row whose position ids restart at 0 for
  each of its rows) is attended row by row with causal SDPA, the way flash-attention's varlen kernels do on a GPU.
  Anything else (padded batches, generation with a cache) goes to transformers' own SDPA unchanged.
- `packed_batches(model)`: while it is active, a right-padded batch entering the decoder without a cache (a
  training forward) is packed into one sequence of its real tokens (positions restart per row), and the decoder's
  output is scattered back to the padded layout, so the trainer's loss code sees the shapes it built. A row
  attends to what it attends to in the padded batch and its pad positions (masked out of every loss) come back as
  zero vectors.

Both compute the same function as the padded batch; only float rounding differs (hidden states ~1e-5 apart).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

VARLEN = "nlsr_sdpa_varlen"


def row_lengths(position_ids: torch.Tensor) -> list[int] | None:
    """The lengths of the rows packed in a one-row `position_ids` (transformers' own rule: a new row starts wherever
    the position does not step by one), or None when it holds a single row."""
    from transformers.masking_utils import find_packed_sequence_indices
    rows = find_packed_sequence_indices(position_ids.reshape(1, -1))
    return None if rows is None else torch.bincount(rows[0]).tolist()


def varlen_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' SDPA attention, row by row for a packed sequence (query/key/value: batch, heads, N, dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    n = query.shape[2]
    packed = (position_ids is not None and query.shape[0] == 1 and key.shape[2] == n
              and position_ids.shape[-1] == n)
    lengths = row_lengths(position_ids) if packed else None
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # each row alone, causal, without the N x N block-diagonal mask (ignored: it says the same thing)
    outs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))]
    return torch.cat(outs, dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(VARLEN, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, sdpa_mask)


def _transformers_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def varlen_attention(model):
    """Attend packed sequences row by row while the block runs; a model not on SDPA is left as it is."""
    inner = _transformers_model(model)
    if getattr(inner.config, "_attn_implementation", None) != "sdpa":
        yield
        return
    _register()
    inner.set_attn_implementation(VARLEN)
    try:
        yield
    finally:
        inner.set_attn_implementation("sdpa")


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(dim=1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


@contextmanager
def packed_batches(model):
    """Pack right-padded batches entering the decoder (the model's `base_model`) while the block runs."""
    decoder = _transformers_model(model).base_model
    pending: list[torch.Tensor | None] = []

    def pack(module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        # a training forward: the trainers ask for no cache (generation does, and keeps its padded batch)
        plain = (not args and ids is not None and mask is not None and mask.dim() == 2
                 and kwargs.get("use_cache") is False and kwargs.get("position_ids") is None
                 and kwargs.get("past_key_values") is None)
        if not plain or bool(mask.all()) or not _right_padded(mask):
            pending.append(None)
            return None
        keep = mask.bool()
        pending.append(keep)
        position_ids = (mask.long().cumsum(dim=1) - 1)[keep][None]
        return args, {**kwargs, "input_ids": ids[keep][None], "attention_mask": None, "position_ids": position_ids}

    def unpack(module, args, output):
        keep = pending.pop()
        if keep is None:
            return None
        packed = output.last_hidden_state
        full = packed.new_zeros(*keep.shape, packed.shape[-1])
        full[keep] = packed[0]
        output.last_hidden_state = full
        return output

    handles = [decoder.register_forward_pre_hook(pack, with_kwargs=True), decoder.register_forward_hook(unpack)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
