"""Padding-free training forwards (nlsr.packing) on the real SmolLM2, whose hidden states depend on the context (the
tiny random Llama's barely do): a packed batch, attended row by row, gives each row the hidden states and gradients
of the padded batch; positions running on across rows would not."""
from __future__ import annotations

import pytest
import torch

from nlsr import modeling, packing
from nlsr.config import LoraConfig

ROWS = ["How do I bake bread at home?", "Name three colours.",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "Why is the sky blue? Answer in one sentence, please, for a child of five."]


@pytest.fixture(scope="module")
def peft_smollm(embedded_base):
    from peft import get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(modeling.load_model(embedded_base, "float32", "cpu"), modeling.peft_lora_config(
        LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])))
    for name, p in model.named_parameters():  # a trained-looking adapter: B = 0 would hide the adapter's gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, modeling.load_tokenizer(embedded_base)


def _padded(tok):
    rows = [tok(r)["input_ids"] for r in ROWS]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def _forward(model, ids, mask):
    """Per-row hidden states of the padded layout and the gradients of a loss over the real tokens."""
    model.zero_grad()
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    (hidden[mask.bool()] ** 2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return hidden.detach(), grads


def test_a_packed_batch_gives_the_padded_batch_states_and_gradients(peft_smollm):
    model, tok = peft_smollm
    ids, mask = _padded(tok)
    assert not bool(mask.all())  # rows of different lengths: there is padding to remove
    ref_h, ref_g = _forward(model, ids, mask)
    with packing.packed_batches(model), packing.varlen_attention(model):
        assert model.get_base_model().config._attn_implementation == packing.VARLEN
        h, g = _forward(model, ids, mask)
    assert model.get_base_model().config._attn_implementation == "sdpa"  # restored
    keep = mask.bool()
    torch.testing.assert_close(h[keep], ref_h[keep], rtol=1e-4, atol=2e-4)
    assert bool((h[~keep] == 0).all())  # pad positions come back as zero vectors
    assert ((g - ref_g).norm() / ref_g.norm()).item() < 1e-5
    with packing.packed_batches(model):  # the same with transformers' block-diagonal mask instead of row by row
        h_mask, _ = _forward(model, ids, mask)
    torch.testing.assert_close(h_mask[keep], ref_h[keep], rtol=1e-4, atol=2e-4)


def test_rows_that_see_each_other_would_differ(peft_smollm):
    """What the equality above rules out: the packed sequence attended as one row (positions running on)."""
    model, tok = peft_smollm
    ids, mask = _padded(tok)
    keep = mask.bool()
    ref_h, _ = _forward(model, ids, mask)
    with torch.no_grad():
        leaky = model.get_base_model().model(input_ids=ids[keep][None], use_cache=False).last_hidden_state[0]
    assert (leaky - ref_h[keep]).abs().max().item() > 1.0


def test_only_packed_right_padded_batches_change_path(peft_smollm):
    """Left padding (generation), a full batch and a cache keep transformers' own path; the hooks leave no trace."""
    model, tok = peft_smollm
    ids, mask = _padded(tok)
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    decoder = model.get_base_model().model
    with torch.no_grad():
        ref = decoder(input_ids=left_ids, attention_mask=left_mask, use_cache=False).last_hidden_state
        with packing.packed_batches(model), packing.varlen_attention(model):
            got = decoder(input_ids=left_ids, attention_mask=left_mask, use_cache=False).last_hidden_state
            cached = decoder(input_ids=ids[:1], attention_mask=mask[:1], use_cache=True)
    assert torch.equal(got, ref)
    assert cached.past_key_values is not None
    assert not decoder._forward_pre_hooks and not decoder._forward_hooks


def test_row_lengths():
    assert packing.row_lengths(torch.tensor([[0, 1, 2, 0, 1, 0]])) == [3, 2, 1]
    assert packing.row_lengths(torch.tensor([[0, 1, 2, 3]])) is None
    assert packing.row_lengths(torch.tensor([[5, 6, 7]])) is None  # one row that starts later (a cache's offset)
