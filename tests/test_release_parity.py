"""Release parity of NLSR (issue 12, item 6): under direction 'code' the adaptive selection draws as the release's
`Adaptive_Search_Operation` does (float32 probabilities, its tie order, torch.manual_seed's CPU stream), and
scoring.calibration_format 'code' formats calibration rows as the release's data.py does."""
import pytest
import torch

from helpers_method import calibration_rows
from nlsr import modeling
from nlsr.config import RealignConfig
from nlsr.data import format_prompt
from nlsr.realign import release_probabilities, select_modules
from nlsr.scoring import ScoringError, encode_calibration


def release_draw(similarities, prune_rate, epsilon, seed):
    """The release's recipe, written out from its source (src/safe_lora/inner.py), on CPU."""
    torch.manual_seed(seed)
    t = torch.tensor(similarities)  # python floats -> float32
    order = torch.argsort(t, dim=0, descending=True)
    ranking = torch.zeros_like(t, dtype=t.dtype)
    ranking[order] = torch.arange(t.size(0) + 1, 1, step=-1, dtype=t.dtype)
    rng = ranking.max(dim=0, keepdim=True).values - ranking.min(dim=0, keepdim=True).values
    norm = (ranking - ranking.min(dim=0, keepdim=True).values) / rng
    p = ((prune_rate - epsilon) + norm * (2 * epsilon)).clip(0, 1)
    return p, torch.bernoulli(p).to(t.dtype) == 1


def _sims(n, seed):
    return (0.7 + 0.3 * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).tolist()


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_code_direction_draws_bit_identical_to_the_release(seed):
    sims = _sims(210, seed)  # SmolLM2: 30 layers × 7 modules
    cfg = RealignConfig(direction="code", layer_rate=0.3, epsilon=0.2, seed=seed)
    with torch.random.fork_rng():
        p_rel, drawn = release_draw(sims, 0.3, 0.2, seed)
    patched, p_prune, _ = select_modules(sims, cfg)
    assert torch.equal(p_prune.float(), p_rel) and torch.equal(patched, drawn)


def test_float64_probabilities_would_draw_differently():
    """Why float32 matters: the same seed on float64 probabilities gives other draws (the test above can fail)."""
    sims = _sims(210, 0)
    p32 = release_probabilities(sims, 0.3, 0.2)
    d32 = torch.bernoulli(p32, generator=torch.Generator().manual_seed(42))
    d64 = torch.bernoulli(p32.double(), generator=torch.Generator().manual_seed(42))
    assert not torch.equal(d32, d64)


def test_code_tie_order_is_the_releases():
    """Two modules tie in float32 (0.5 and 0.5 + 1e-12): the release's descending argsort ranks the earlier one
    higher; the paper direction's stable ascending float64 ranks the later one higher."""
    sims = [0.5, 0.5 + 1e-12, 0.3]
    code = RealignConfig(direction="code", layer_rate=0.5, epsilon=0.2)
    _, p_code, _ = select_modules(sims, code)
    p_rel, _ = release_draw(sims, 0.5, 0.2, 0)
    assert torch.equal(p_code.float(), p_rel)
    assert p_code.tolist() == pytest.approx([0.7, 0.5, 0.3], abs=1e-7)
    _, p_paper, _ = select_modules(sims, RealignConfig(direction="paper", layer_rate=0.5, epsilon=0.2))
    assert p_paper.tolist() == pytest.approx([0.5, 0.7, 0.3])
    _, p_exact_tie, _ = select_modules([0.4, 0.9, 0.4, 0.9, 0.6], code)  # exact ties: the release's order too
    assert torch.equal(p_exact_tie.float(), release_draw([0.4, 0.9, 0.4, 0.9, 0.6], 0.5, 0.2, 0)[0])


def test_one_module_gets_the_base_rate():
    patched, p, _ = select_modules([0.8], RealignConfig(direction="code", layer_rate=0.4, epsilon=0.1))
    assert p.tolist() == pytest.approx([0.4]) and patched.shape == (1,)


def test_release_calibration_format(tiny_base):
    tok = modeling.load_tokenizer(tiny_base)
    row = calibration_rows(1)[0]
    (ids, is_resp), = encode_calibration(tok, [row], max_length=12, fmt="code")
    prompt = tok(format_prompt(row["prompt"]).removesuffix("\n"))["input_ids"]
    response = tok(row["response"])["input_ids"][1:][:12]  # the first token is dropped, whatever it is
    assert ids[0].tolist() == prompt + response
    assert is_resp[0].tolist() == [False] * len(prompt) + [True] * len(response)
    (paper_ids, paper_resp), = encode_calibration(tok, [row], max_length=12)
    assert paper_ids[0].tolist() != ids[0].tolist()
    assert paper_ids[0, :int((~paper_resp[0]).sum())].tolist() == tok(format_prompt(row["prompt"]))["input_ids"]
    with pytest.raises(ScoringError, match="template 'alpaca'"):
        encode_calibration(tok, [row], 12, template="chat", fmt="code")
