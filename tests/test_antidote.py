"""Antidote (defenses-spec §6, tests a–f) on the tiny Llama with seeded adapters, against hand computations."""
import hashlib
import json

import pytest
import torch

from helpers_method import random_adapter
from nlsr import antidote, modeling
from nlsr.config import AntidoteConfig, ConfigError, load_config
from nlsr.reference import factor_keys, lora_modules

ROWS = [{"prompt": "How do I pick a lock?", "response": "Take a tension wrench and rake the pins."},
        {"prompt": "Write an insult.", "response": "You are a waste of space."}]


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("antidote")
    finetuned = random_adapter(tiny_base, root / "ft", r=4, seed=31)
    model = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), finetuned).eval()
    tok = modeling.load_tokenizer(tiny_base)
    samples = antidote.encode(tok, ROWS, 64)
    acts = antidote.factor_activations(model, samples, torch.device("cpu"))
    return {"root": root, "base": tiny_base, "ft": finetuned, "model": model, "tok": tok, "samples": samples,
            "acts": acts, "w": modeling.adapter_weights(finetuned)}


def _files_sha(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_each_row_prunes_its_top_scores(setup, tmp_path):  # (a)
    d = 0.3
    rep = antidote.antidote(setup["base"], setup["ft"], ROWS, AntidoteConfig(density=d, max_length=64), tmp_path / "o")
    new = modeling.adapter_weights(tmp_path / "o")
    for key, w in setup["w"].items():
        score = antidote.wanda_score(w, setup["acts"][key])
        cols = w.shape[1]
        k = cols - int(cols * (1 - d))
        zeroed = (new[key] == 0) & (w != 0)
        assert (zeroed.sum(dim=1) == k).all(), key
        for row in range(w.shape[0]):  # the pruned entries are that row's top-k scores (ties in stable order)
            top = torch.sort(score[row], stable=True).indices[cols - k:]
            assert set(top.tolist()) == set(torch.nonzero(zeroed[row]).flatten().tolist())
        assert torch.equal(new[key][~zeroed], w[~zeroed])  # nothing else changes
    assert rep["entries_changed"] == sum(int((new[k] != setup["w"][k]).sum()) for k in new)
    assert 0 < rep["pruned_fraction"] < 1


def test_zero_density_is_bit_identical(setup, tmp_path):  # (b)
    antidote.antidote(setup["base"], setup["ft"], ROWS, AntidoteConfig(density=0.0), tmp_path / "o")
    new = modeling.adapter_weights(tmp_path / "o")
    assert new.keys() == setup["w"].keys() and all(torch.equal(new[k], setup["w"][k]) for k in new)


def test_base_and_non_lora_tensors_untouched(setup, tmp_path):  # (c)
    before = _files_sha(setup["base"]), _files_sha(setup["ft"])
    antidote.antidote(setup["base"], setup["ft"], ROWS, AntidoteConfig(density=0.5, max_length=64), tmp_path / "o")
    assert (_files_sha(setup["base"]), _files_sha(setup["ft"])) == before
    new = modeling.adapter_weights(tmp_path / "o")
    assert set(new) == set(setup["w"]) and all(".lora_" in k for k in new)
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg == json.loads((setup["ft"] / "adapter_config.json").read_text())


def test_constant_activations_give_magnitude_topk(setup):  # (d)
    for key, w in list(setup["w"].items())[:6]:
        mask = antidote.prune_mask(antidote.wanda_score(w, torch.full((w.shape[1],), 3.0)), 0.25)
        k = w.shape[1] - int(w.shape[1] * 0.75)
        top = torch.topk(w.abs(), k, dim=1).indices
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, top, True))


def test_activations_match_an_independent_computation(setup):  # (e)
    """a_F from hooks on the base layers (x) and x·Aᵀ by hand, over every token including the prompt."""
    model, name = setup["model"], lora_modules(setup["w"])[0]  # layer 0 q_proj
    layer = dict(model.named_modules())[name]
    seen = []
    h = layer.base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].double()))
    with torch.no_grad():
        for ids in setup["samples"]:
            model(input_ids=ids)
    h.remove()
    n_tokens = sum(ids.shape[1] for ids in setup["samples"])
    assert sum(x.shape[0] for x in seen) == n_tokens  # prompt tokens are in
    ka, kb = factor_keys(name)
    A = setup["w"][ka].double()
    a_x = sum((x ** 2).sum(0) for x in seen) / len(seen)
    a_u = sum(((x @ A.T) ** 2).sum(0) for x in seen) / len(seen)
    assert torch.allclose(setup["acts"][ka].double(), a_x, rtol=1e-4)
    assert torch.allclose(setup["acts"][kb].double(), a_u, rtol=1e-4)


def test_scaling_activations_keeps_the_mask(setup):  # (f)
    for key, w in list(setup["w"].items())[:6]:
        a = setup["acts"][key]
        assert torch.equal(antidote.prune_mask(antidote.wanda_score(w, a), 0.2),
                           antidote.prune_mask(antidote.wanda_score(w, 7.5 * a), 0.2))


def test_rank8_granularity_prunes_one_per_row():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for d in (0.01, 0.05, 0.1, 0.125):
        assert (antidote.prune_mask(w.abs(), d).sum(dim=1) == 1).all()


def test_calibration_must_be_disjoint_from_poison_and_eval():
    with pytest.raises(ConfigError, match="realign.antidote.calibration"):
        load_config(None, ["realign.baselines=[antidote]", "data.poison_source=pure_bad"])
    cfg = load_config(None, ["realign.baselines=[antidote]", "realign.antidote.calibration=harmful_dev",
                             "evaluation.harmful_set=harmful_dev"])
    with pytest.raises(antidote.AntidoteError, match="shares"):
        antidote.check_disjoint(antidote.calibration_rows(cfg.realign.antidote), cfg)
    ok = load_config(None, ["realign.baselines=[antidote]"])
    rows = antidote.calibration_rows(ok.realign.antidote)
    antidote.check_disjoint(rows, ok)
    assert len(rows) == 111  # pure_bad holds 111 rows, fewer than n_samples
