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
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16,
             progress: bool = False, desc: str = "generate", stop_strings: Sequence[str] = (),
             share_prefix: bool = True) -> list[str]:
    """Greedy answers to already-formatted prompts, in input order; a row stops at EOS or once its new text
    holds one of `stop_strings` (the text returned then still holds it: callers cut where they want).

    Prompts are sorted by length so each batch pads little (refusals are short: stopping at EOS matters). With
    `share_prefix` the tokens that open every prompt are computed once (module docstring); without it, or when
    the prompts share nothing, each batch is left-padded.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids = tokenizer(list(prompts))["input_ids"]
    prefix = shared_prefix(ids) if share_prefix else []
    cache = model(input_ids=torch.tensor([prefix], device=device), use_cache=True).cache if prefix else None
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        input_ids, mask = _layout([ids[i] for i in idx], len(prefix), tokenizer.pad_token_id, device)
        if cache is not None:
            extra["cache"] = copy.deepcopy(cache)  # generate extends it in place: a fresh copy per batch
            extra["cache"].batch_repeat_interleave(len(idx))
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
