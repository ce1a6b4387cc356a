"""Realignment: r × r similarity, adaptive selection, neuron transplant, baselines, mismatch errors."""
import hashlib

import pytest
import torch
from pydantic import ValidationError

from helpers_method import perturbed_adapter, random_adapter
from nlsr import modeling
from nlsr.config import ConfigError, LoraConfig, ModelConfig, RealignConfig, ReferenceConfig, TinyModel
from nlsr.realign import (REPORT_NAME, AdapterMismatch, RealignError, product_cosine, prune_probabilities,
                          read_report, realign, safelora_projection, select_modules)
from nlsr.reference import build_reference, factor_keys, lora_modules
from nlsr.scoring import keep_mask, save_masks


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """aligned → reference (paper mode), fine-tuned = aligned + noise, and random 20 % masks."""
    root = tmp_path_factory.mktemp("realign")
    aligned = random_adapter(tiny_base, root / "aligned", r=4, seed=11)
    reference = root / "reference"
    build_reference(aligned, reference, ReferenceConfig(beta=0.9))
    finetuned = perturbed_adapter(aligned, root / "finetuned", seed=12, noise=0.08)
    g = torch.Generator().manual_seed(13)
    masks = {k: keep_mask(torch.rand(v.shape, generator=g), 0.8, "global")
             for k, v in modeling.adapter_weights(reference).items()}
    mask_file = save_masks(masks, root / "masks.safetensors", {"method": "random"})
    return {"root": root, "aligned": aligned, "reference": reference, "finetuned": finetuned, "masks": mask_file,
            "mask_w": masks}


def _sha(path):
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- similarity

def test_rxr_cosine_equals_materialised_cosine():
    g = torch.Generator().manual_seed(0)
    for r, d_in, d_out in ((4, 30, 20), (8, 16, 48)):
        A1, A2 = torch.randn(r, d_in, generator=g), torch.randn(r, d_in, generator=g)
        B1, B2 = torch.randn(d_out, r, generator=g), torch.randn(d_out, r, generator=g)
        M = torch.rand(r, d_in, generator=g) > 0.7
        W1, W2 = B1.double() @ (A1 * M).double(), B2.double() @ (A2 * M).double()  # d_out × d_in, here only
        want = torch.nn.functional.cosine_similarity(W1.flatten(), W2.flatten(), dim=0)
        assert product_cosine(A1 * M, B1, A2 * M, B2) == pytest.approx(float(want), abs=1e-12)
    assert product_cosine(A1, B1, A1, 2.5 * B1) == pytest.approx(1.0)
    assert product_cosine(A1, B1, A1, -B1) == pytest.approx(-1.0)
    assert product_cosine(A1 * 0, B1, A2, B2) == 0.0


# ---------------------------------------------------------------------------------------------- selection

def test_probabilities_follow_the_similarity_rank():
    sims = [0.9, 0.1, 0.5, 0.3]
    p = prune_probabilities(sims, 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([0.7, 0.3, 0.5 + 0.2 / 3, 0.5 - 0.2 / 3], dtype=torch.float64))
    assert float(p.mean()) == pytest.approx(0.5)
    # code direction: patch iff γ = 1 (spec A6: [0.7, 0.3, 0.567, 0.433]); paper: patch iff γ = 0
    _, _, p_code = select_modules(sims, RealignConfig(direction="code"))
    _, _, p_paper = select_modules(sims, RealignConfig(direction="paper"))
    torch.testing.assert_close(p_code, p)
    torch.testing.assert_close(p_paper, 1 - p)
    assert p_paper.argmax() == 1 and p_code.argmax() == 0  # paper: the least similar is the most likely patched


def test_bernoulli_draws_match_the_probabilities():
    sims = torch.linspace(-1, 1, 40).tolist()
    counts = {"paper": torch.zeros(40), "code": torch.zeros(40)}
    for seed in range(300):
        for direction in counts:
            counts[direction] += select_modules(sims, RealignConfig(seed=seed, direction=direction))[0].double()
    freq_paper, freq_code = counts["paper"] / 300, counts["code"] / 300
    assert freq_paper[:10].mean() > 0.62 and freq_paper[-10:].mean() < 0.38
    assert freq_code[:10].mean() < 0.38 and freq_code[-10:].mean() > 0.62
    same = [select_modules(sims, RealignConfig(seed=7))[0] for _ in range(2)]
    assert torch.equal(*same)


def test_out_of_range_rates_fail_clearly():
    with pytest.raises(ValidationError, match="layer_rate ± realign.epsilon must stay in"):
        RealignConfig(layer_rate=0.9, epsilon=0.2)
    with pytest.raises(ValidationError):
        RealignConfig(epsilon=0.7)
    with pytest.raises(ValidationError):
        RealignConfig(safelora_tau=1.5)


# ---------------------------------------------------------------------------------------------- nlsr

def test_nlsr_changes_only_masked_entries_of_patched_modules(adapters, tmp_path):
    before = _sha(adapters["finetuned"])
    rep = realign(None, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(),
                  tmp_path / "out")
    assert _sha(adapters["finetuned"]) == before  # input never modified
    ft, ref = modeling.adapter_weights(adapters["finetuned"]), modeling.adapter_weights(adapters["reference"])
    new, masks = modeling.adapter_weights(tmp_path / "out"), adapters["mask_w"]
    assert rep["method"] == "nlsr" and rep["n_modules"] == 14 == len(rep["modules"])
    assert 0 < rep["n_patched"] < 14
    total = 0
    for row in rep["modules"]:
        for key in factor_keys(row["module"]):
            m = masks[key]
            assert torch.equal(new[key][~m], ft[key][~m])
            if row["patched"]:
                assert torch.equal(new[key][m], ref[key][m])
                total += int((new[key] != ft[key]).sum())
            else:
                assert torch.equal(new[key], ft[key])
    assert total == rep["entries_changed"] > 0
    assert read_report(tmp_path / "out") == rep
    assert modeling.adapter_config(tmp_path / "out") == modeling.adapter_config(adapters["finetuned"])


def test_report_similarities_are_the_masked_product_cosines(adapters, tmp_path):
    rep = realign(None, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(),
                  tmp_path / "out")
    ft, ref = modeling.adapter_weights(adapters["finetuned"]), modeling.adapter_weights(adapters["reference"])
    masks = adapters["mask_w"]
    for row in rep["modules"]:
        ka, kb = factor_keys(row["module"])
        w_t = (ft[kb] * masks[kb]).double() @ (ft[ka] * masks[ka]).double()
        w_e = (ref[kb] * masks[kb]).double() @ (ref[ka] * masks[ka]).double()
        want = torch.nn.functional.cosine_similarity(w_t.flatten(), w_e.flatten(), dim=0)
        assert row["similarity"] == pytest.approx(float(want), abs=1e-10)
    ranks = sorted(rep["modules"], key=lambda r: r["rank"])
    assert [r["similarity"] for r in ranks] == sorted(r["similarity"] for r in rep["modules"])
    assert all(a["p_patch"] >= b["p_patch"] for a, b in zip(ranks, ranks[1:]))  # paper direction


def test_same_seed_gives_byte_identical_adapters(adapters, tmp_path):
    outs = [tmp_path / f"out{i}" for i in range(3)]
    for out, seed in zip(outs, (42, 42, 5)):
        realign(None, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(seed=seed), out)
    assert _sha(outs[0]) == _sha(outs[1])
    patched = [[m["patched"] for m in read_report(o)["modules"]] for o in outs]
    assert patched[0] == patched[1] != patched[2]


def test_restore_modules_replaces_whole_selected_modules(adapters, tmp_path):
    rep = realign(None, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(),
                  tmp_path / "out", method="restore-modules")
    nlsr = realign(None, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(),
                   tmp_path / "nlsr")
    ft, ref = modeling.adapter_weights(adapters["finetuned"]), modeling.adapter_weights(adapters["reference"])
    new = modeling.adapter_weights(tmp_path / "out")
    assert [m["patched"] for m in rep["modules"]] == [m["patched"] for m in nlsr["modules"]]
    for row in rep["modules"]:
        for key in factor_keys(row["module"]):
            assert torch.equal(new[key], ref[key] if row["patched"] else ft[key])


# ---------------------------------------------------------------------------------------------- safelora

def test_safelora_projection_equals_the_materialised_release_formula():
    g = torch.Generator().manual_seed(3)
    r, d_in, d_out = 4, 24, 18
    A_t, A_e = torch.randn(r, d_in, generator=g, dtype=torch.float64), torch.randn(r, d_in, generator=g,
                                                                                  dtype=torch.float64)
    B_t, B_e = torch.randn(d_out, r, generator=g, dtype=torch.float64), torch.randn(d_out, r, generator=g,
                                                                                   dtype=torch.float64)
    V = (B_e @ A_e).T  # the release's d_in × d_out convention: V = A_eᵀ B_eᵀ, f = A_tᵀ B_tᵀ
    C = V @ V.T / torch.linalg.norm(V)
    f = (B_t @ A_t).T
    want_sim = torch.nn.functional.cosine_similarity((C @ f).flatten(), f.flatten(), dim=0)
    A_proj, sim = safelora_projection(A_t, B_t, A_e, B_e)
    torch.testing.assert_close(A_proj, (C @ A_t.T).T)
    assert sim == pytest.approx(float(want_sim), abs=1e-10)


def test_safelora_projects_modules_below_tau(adapters, tmp_path):
    ft = modeling.adapter_weights(adapters["finetuned"])
    none = realign(None, adapters["aligned"], adapters["finetuned"], None, RealignConfig(safelora_tau=0.0),
                   tmp_path / "none", method="safelora")
    assert none["n_patched"] == 0 and _sha(tmp_path / "none") == _sha(adapters["finetuned"])
    every = realign(None, adapters["aligned"], adapters["finetuned"], None, RealignConfig(safelora_tau=1.0),
                    tmp_path / "all", method="safelora")
    new = modeling.adapter_weights(tmp_path / "all")
    assert every["n_patched"] == sum(m["similarity"] < 1.0 for m in every["modules"]) > 0
    for row in every["modules"]:
        ka, kb = factor_keys(row["module"])
        assert torch.equal(new[kb], ft[kb])  # B untouched, A projected
        assert torch.equal(new[ka], ft[ka]) != row["patched"]


# ---------------------------------------------------------------------------------------------- errors

def test_mismatched_adapters_fail_naming_both_files(adapters, tiny_base, tmp_path):
    ref, ft = adapters["reference"], adapters["finetuned"]
    rank8 = random_adapter(tiny_base, tmp_path / "rank8", r=8)
    with pytest.raises(AdapterMismatch, match=f"{ref}.*{rank8}.*differ in r: 4 vs 8"):
        realign(None, ref, rank8, adapters["masks"], RealignConfig(), tmp_path / "out")
    attn = random_adapter(tiny_base, tmp_path / "attn", r=4, targets=["q_proj", "v_proj"])
    with pytest.raises(AdapterMismatch, match="differ in target_modules"):
        realign(None, ref, attn, adapters["masks"], RealignConfig(), tmp_path / "out")
    other_masks = save_masks({k: v for k, v in adapters["mask_w"].items() if "layers.1.mlp" not in k},
                             tmp_path / "partial.safetensors", {})
    with pytest.raises(AdapterMismatch, match=f"masks {other_masks} do not fit the adapter {ft}: missing"):
        realign(None, ref, ft, other_masks, RealignConfig(), tmp_path / "out")
    key = sorted(adapters["mask_w"])[0]  # every key present, one of them transposed
    bent = save_masks({k: v.T.contiguous() if k == key else v for k, v in adapters["mask_w"].items()},
                      tmp_path / "bent.safetensors", {})
    shape = tuple(adapters["mask_w"][key].shape)
    with pytest.raises(AdapterMismatch, match=rf"masks {bent} do not fit .*{key} mask shape \({shape[1]}, "
                                              rf"{shape[0]}\) vs weight \({shape[0]}, {shape[1]}\)"):
        realign(None, ref, ft, bent, RealignConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_fails(adapters, tmp_path):
    other_base = modeling.base_folder(ModelConfig(source="tiny", tiny=TinyModel(hidden_size=32)), tmp_path)
    with pytest.raises(modeling.ModelError, match="another base"):
        realign(other_base, adapters["reference"], adapters["finetuned"], adapters["masks"], RealignConfig(),
                tmp_path / "out")
    other = modeling.save_adapter(modeling.attach_lora(modeling.load_model(other_base, device="cpu"),
                                                       LoraConfig(r=4, alpha=8)), tmp_path / "other")
    with pytest.raises(AdapterMismatch, match="shape"):
        realign(None, adapters["reference"], other, None, RealignConfig(), tmp_path / "out", method="safelora")


def test_misuse_fails_clearly(adapters, tmp_path):
    ref, ft = adapters["reference"], adapters["finetuned"]
    with pytest.raises(RealignError, match="needs the safety-critical neuron masks"):
        realign(None, ref, ft, None, RealignConfig(), tmp_path / "out")
    with pytest.raises(RealignError, match="never modifies an adapter in place"):
        realign(None, ref, ft, adapters["masks"], RealignConfig(), ft)
    with pytest.raises(RealignError, match="unknown realign method"):
        realign(None, ref, ft, adapters["masks"], RealignConfig(), tmp_path / "out", method="prune")
    bad = RealignConfig().model_copy(update={"layer_rate": 0.95})  # unvalidated, its nested configs kept as models
    with pytest.raises(ConfigError, match="layer_rate"):
        realign(None, ref, ft, adapters["masks"], bad, tmp_path / "out")
    with pytest.raises(modeling.ModelError, match="no adapter_config.json"):
        realign(None, tmp_path / "missing", ft, adapters["masks"], RealignConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (ft / REPORT_NAME).exists()
    assert lora_modules(modeling.adapter_weights(ft))  # still intact
