"""Batched greedy decoding: left padding, KV cache, stop at EOS or at a stop string, a max-new-tokens budget.

Stop strings (the evaluation passes the Alpaca turn markers) end a row as soon as its text holds one, with
transformers' own StopStringCriteria; a batch ends when all its rows have. Greedy decoding is unchanged by it: a
row's tokens up to the stop are the same as without it, only the tokens after it (which the evaluation cuts off
anyway) are never computed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16,
             progress: bool = False, desc: str = "generate", stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy answers to already-formatted prompts, in input order; a row stops at EOS or once its new text
    holds one of `stop_strings` (the text returned then still holds it: callers cut where they want).

    Prompts are sorted by length so each batch pads little (refusals are short: stopping at EOS matters).
    """
    if not prompts:
        return []
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    stop = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True, **stop)
        new = out[:, enc["input_ids"].shape[1]:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers
