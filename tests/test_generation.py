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


def test_lean_decoding_changes_no_answer(tiny_base):
    """The preallocated KV cache and the few-row weight-major products give the same tokens as transformers' own
    cache and F.linear, with and without the shared prefix, over full and partial batches; the layers are restored."""
    model = modeling.load_model(tiny_base, "float32", "cpu").eval()
    tok = modeling.load_tokenizer(tiny_base)
    prompts = [data.format_prompt(r["prompt"], "", "alpaca", tok) for r in data.harmful_prompts("harmful_dev", 7)] + \
        [data.format_prompt(r["instruction"], r["input"], "alpaca", tok) for r in data.task_eval_set("sst2", 3)]
    for share in (True, False):
        plain = generate(model, tok, prompts, 16, batch_size=4, share_prefix=share, lean_decoding=False)
        assert generate(model, tok, prompts, 16, batch_size=4, share_prefix=share) == plain
    assert not any("forward" in vars(m) for m in model.modules())


def test_weight_major_product_and_preallocated_cache():
    import torch
    from transformers.cache_utils import DynamicLayer

    from nlsr.generation import WEIGHT_MAJOR_ROWS, _PreallocatedLayer, _weight_major
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    for rows in (1, 5, WEIGHT_MAJOR_ROWS, WEIGHT_MAJOR_ROWS + 1):
        x = torch.randn(rows, 1, 24)
        want = layer(x)
        with _weight_major(layer, True):
            got = layer(x)
        assert got.shape == want.shape and got.is_contiguous() and torch.allclose(got, want, atol=1e-6)
    # the cache: the same keys and values as DynamicLayer's concatenation, written in place while there is room
    pre, ref = _PreallocatedLayer(capacity=8), DynamicLayer()
    steps = [torch.randn(3, 2, t, 4) for t in (5, 1, 1, 1, 2)]  # the last step outgrows the capacity: new buffers
    for k in steps:
        got, want = pre.update(k, -k), ref.update(k, -k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if pre.get_seq_length() == 6:
            ptr = pre.keys.data_ptr()
        if pre.get_seq_length() == 8:
            assert pre.keys.data_ptr() == ptr  # no copy while the buffer had room
    pre.batch_select_indices(torch.tensor([2, 0]))
    ref.batch_select_indices(torch.tensor([2, 0]))
    k = torch.randn(2, 2, 1, 4)
    assert torch.equal(pre.update(k, k)[0], ref.update(k, k)[0])
