"""Batched greedy decoding: KV cache, stop at EOS or at a stop string, a max-new-tokens budget, and the prompts'
shared opening computed once.

Stop strings (the evaluation passes the Alpaca turn markers) end a row as soon as its text holds one, with
transformers' own StopStringCriteria; a batch ends when all its rows have. Greedy decoding is unchanged by it: a
row's tokens up to the stop are the same as without it, only the tokens after it (which the evaluation cuts off
anyway) are never computed.

The shared prefix: every evaluation prompt opens with the same template text (Alpaca's preamble is 24 of the 45
tokens of a mean `harmful_eval` prompt), and computing it again for every row is pure waste (on a 2-core CPU a
prompt position costs ~1.8 ms against ~13 ms per decoded one: the gain is largest for short answers, e.g. SST-2's
labels). So the tokens all prompts share are run once, their keys and values copied to every row of a batch, and each row
is laid out as [shared prefix][padding][its own tokens]: the padding is masked out and the positions come from the
attention mask, so every real token sits at the position it has without padding, as with left padding.

Two wastes of a decode step, removed without changing a bit of the answers (benchmarks/evaluation.py: 1.2× per
evaluation of 256 harmful prompts on a 2-core CPU):
- Few-row products: a decode step multiplies each weight by one row per sequence (32 rows at the default batch), and
  on the CPU MKL runs `x @ W.T` for so few rows at half its speed: the LM head (49,152 × 576) took 77 ms at 32
  rows against 44 ms as `(W @ x.T).T`, with the same bits at 16 to 64 rows. So while decoding on the CPU, float32
  `nn.Linear` layers fed ≤ 64 rows compute the latter (`_weight_major`); longer inputs (the prompts) are unchanged.
- The KV cache: transformers' DynamicCache concatenates every new position to the whole cache (`torch.cat`, ~12 %
  of a decode step at batch 32); `_PreallocatedLayer` holds the keys and values in buffers sized for the prompt
  and the answer budget and writes each new position in place.
"""
from __future__ import annotations

import contextlib
import copy
import types
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

WEIGHT_MAJOR_ROWS = 64  # up to this many rows the weight-major product was faster for every SmolLM2 shape (2 cores)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16,
             progress: bool = False, desc: str = "generate", stop_strings: Sequence[str] = (),
             share_prefix: bool = True, lean_decoding: bool = True) -> list[str]:
    """Greedy answers to already-formatted prompts, in input order; a row stops at EOS or once its new text
    holds one of `stop_strings` (the text returned then still holds it: callers cut where they want).

    Prompts are sorted by length so each batch pads little (refusals are short: stopping at EOS matters). With
    `share_prefix` the tokens that open every prompt are computed once (module docstring); without it, or when
    the prompts share nothing, each batch is left-padded. `lean_decoding` (on by default; off only to measure
    them) uses the few-row products (CPU) and the preallocated KV cache of the module docstring.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids = tokenizer(list(prompts))["input_ids"]
    prefix = shared_prefix(ids) if share_prefix else []
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    with _weight_major(model, lean_decoding and device.type == "cpu"):
        cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache if prefix else None
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            input_ids, mask = _layout([ids[i] for i in idx], len(prefix), tokenizer.pad_token_id, device)
            # generate extends the cache in place: a fresh one per batch
            if lean_decoding:
                extra["cache"] = _batch_cache(model, cache, len(idx), input_ids.shape[1] + max_new_tokens)
            elif cache is not None:
                extra["cache"] = _repeated(cache, len(idx))
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=True, **extra)
            new = out[:, input_ids.shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    return answers


def shared_prefix(ids: list[list[int]]) -> list[int]:
    """The longest run of tokens every prompt opens with, leaving each prompt at least one token of its own
    (the forward pass that starts decoding needs one)."""
    shortest = min(map(len, ids))
    n = 0
    while n < shortest - 1 and all(row[n] == ids[0][n] for row in ids):
        n += 1
    return list(ids[0][:n])


def _layout(rows: list[list[int]], n_prefix: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[prefix][padding][own tokens] per row (left padding when n_prefix is 0) and its attention mask."""
    width = max(map(len, rows))
    input_ids = [r[:n_prefix] + [pad] * (width - len(r)) + r[n_prefix:] for r in rows]
    mask = [[1] * n_prefix + [0] * (width - len(r)) + [1] * (len(r) - n_prefix) for r in rows]
    return torch.tensor(input_ids, device=device), torch.tensor(mask, device=device)


@contextlib.contextmanager
def _weight_major(model, on: bool):
    """While inside, float32 `nn.Linear` layers fed ≤ WEIGHT_MAJOR_ROWS rows compute (W @ x.T).T (module docstring)."""
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32] if on else []
    for m in layers:
        m.forward = types.MethodType(_weight_major_forward, m)
    try:
        yield
    finally:
        for m in layers:
            vars(m).pop("forward", None)


def _weight_major_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > WEIGHT_MAJOR_ROWS:
        return F.linear(x, self.weight, self.bias)
    y = torch.mm(self.weight, rows.t()).t().contiguous()  # the attention's .view() needs it contiguous
    if self.bias is not None:
        y += self.bias
    return y.view(*x.shape[:-1], y.shape[-1])


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room for `capacity` positions: each update
    writes in place. If the layer is reshaped elsewhere (cropped rows, a longer input), it moves to new buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self._buffers = capacity, None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if not self._holds(n, t, key_states):
            room = max(self.capacity, n + t)
            self._buffers = [s.new_empty(*s.shape[:-2], room, s.shape[-1]) for s in (key_states, value_states)]
            if n:
                self._buffers[0][..., :n, :], self._buffers[1][..., :n, :] = self.keys, self.values
        k, v = self._buffers
        k[..., n:n + t, :], v[..., n:n + t, :] = key_states, value_states
        self.keys, self.values = k[..., :n + t, :], v[..., :n + t, :]
        return self.keys, self.values

    def _holds(self, n: int, t: int, states: torch.Tensor) -> bool:
        if self._buffers is None:
            return False
        k = self._buffers[0]
        return (k.shape[:-2] == states.shape[:-2] and k.shape[-2] >= n + t
                and (n == 0 or self.keys.data_ptr() == k.data_ptr()))


def _batch_cache(model, prefix: Cache | None, rows: int, capacity: int) -> Cache:
    """The cache a batch of `rows` rows starts from: the model's own layout (DynamicCache from its config) with each
    plain layer preallocated for `capacity` positions, holding the shared prefix's keys and values once per row."""
    cache = DynamicCache(config=model.config)
    if prefix is not None and len(cache.layers) != len(prefix.layers):  # a layout the config does not spell out
        return _repeated(prefix, rows)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = layer = _PreallocatedLayer(capacity)
        if prefix is not None:
            src = prefix.layers[i]
            layer.update(src.keys.repeat_interleave(rows, dim=0), src.values.repeat_interleave(rows, dim=0))
    return cache


def _repeated(prefix: Cache, rows: int) -> Cache:
    """A copy of the shared prefix's cache with its keys and values once per row (transformers' own layers)."""
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(rows)
    return cache
