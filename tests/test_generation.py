"""Batched greedy decoding: stopping at stop strings ends rows early and changes no answer before the stop."""
from __future__ import annotations

from nlsr import data, modeling
from nlsr.generation import generate


def _cut(text: str, stops: list[str]) -> str:
    return text[:min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


def test_stop_strings_change_no_answer(tiny_base):
    model = modeling.load_model(tiny_base, "float32", "cpu").eval()
    tok = modeling.load_tokenizer(tiny_base)
    prompts = [data.format_prompt(r["prompt"], "", "alpaca", tok) for r in data.harmful_prompts("harmful_dev", 8)]
    full = generate(model, tok, prompts, 24, batch_size=4)
    # The random model never writes an Alpaca marker: stop instead at pieces of what it does write, taken from
    # the middle of two answers (so the stop falls inside the budget, and across token boundaries).
    stops = sorted({w for a in (full[1], full[6]) for w in a.split() if len(w) >= 3}, key=len)[:2]
    assert len(stops) == 2
    stopped = generate(model, tok, prompts, 24, batch_size=4, stop_strings=stops)
    assert [_cut(a, stops) for a in stopped] == [_cut(a, stops) for a in full]
    assert sum(map(len, stopped)) < sum(map(len, full))  # rows did end early


def test_shared_prefix_is_computed_once_and_changes_no_answer(tiny_base):
    """The tokens every prompt opens with (the Alpaca preamble) run once; each batch row is [prefix][padding][own
    tokens]. Same greedy answers as left padding, over prompts of very different lengths, fewer positions computed."""
    import torch

    from nlsr.generation import _layout, shared_prefix
    model = modeling.load_model(tiny_base, "float32", "cpu").eval()
    tok = modeling.load_tokenizer(tiny_base)
    prompts = [data.format_prompt(r["prompt"], "", "alpaca", tok) for r in data.harmful_prompts("harmful_dev", 6)] + \
        [data.format_prompt(r["instruction"], r["input"], "alpaca", tok) for r in data.task_eval_set("sst2", 4)]
    ids = tok(prompts)["input_ids"]
    prefix = shared_prefix(ids)
    assert len(prefix) >= 10 and all(row[:len(prefix)] == prefix for row in ids)
    positions = []
    hook = model.register_forward_pre_hook(lambda _m, a, kw: positions.append(kw["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        padded = generate(model, tok, prompts, 12, batch_size=4, share_prefix=False)
        n_padded, positions[:] = sum(positions), []
        shared = generate(model, tok, prompts, 12, batch_size=4)
    finally:
        hook.remove()
    assert shared == padded and sum(positions) < n_padded
    # without a shared prefix the layout is plain left padding, as the tokenizer pads
    assert shared_prefix([[5, 6], [7, 6]]) == [] and shared_prefix([[5, 6], [5, 6, 7]]) == [5]  # one token left
    tok.padding_side = "left"
    enc = tok(prompts[:3], return_tensors="pt", padding=True)
    input_ids, mask = _layout(ids[:3], 0, tok.pad_token_id, "cpu")
    assert torch.equal(input_ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
