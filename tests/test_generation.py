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
