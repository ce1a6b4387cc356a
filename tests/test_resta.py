"""RESTA (defenses-spec §7, tests a–f) on the tiny Llama with seeded adapters, against hand computations."""
import json

import pytest
import torch

from helpers_method import perturbed_adapter, random_adapter
from nlsr import modeling, resta
from nlsr.config import ConfigError, RestaConfig, load_config
from nlsr.reference import factor_keys, lora_modules

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("resta")
    aligned = random_adapter(tiny_base, root / "aligned", r=4, seed=41, targets=TARGETS)
    finetuned = perturbed_adapter(aligned, root / "ft", seed=42, noise=0.08)
    unaligned = perturbed_adapter(aligned, root / "un", seed=43, noise=0.08)
    return {"root": root, "base": tiny_base, "aligned": aligned, "ft": finetuned, "un": unaligned,
            "w": {k: modeling.adapter_weights(v) for k, v in (("a", aligned), ("t", finetuned), ("u", unaligned))},
            "s": 2.0}  # alpha 2r / r


def _delta(folder):
    """{module: s·B A} of an adapter folder (float64)."""
    cfg, w = modeling.adapter_config(folder), modeling.adapter_weights(folder)
    s = resta.scaling(cfg)
    return {n: s * (w[factor_keys(n)[1]].double() @ w[factor_keys(n)[0]].double()) for n in lora_modules(w)}


def test_gamma_zero_returns_the_finetuned_adapter(adapters, tmp_path):  # (a)
    resta.resta(adapters["aligned"], adapters["ft"], adapters["un"], RestaConfig(gamma=0.0), tmp_path / "o")
    new = modeling.adapter_weights(tmp_path / "o")
    assert all(torch.equal(new[k], v) for k, v in adapters["w"]["t"].items()) and new.keys() == adapters["w"]["t"].keys()


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_added_delta_is_gamma_times_safety_vector(adapters, tmp_path, gamma):  # (b)
    rep = resta.resta(adapters["aligned"], adapters["ft"], adapters["un"], RestaConfig(gamma=gamma), tmp_path / "o")
    assert rep["rank"] == 12 and json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 12
    D, t, a, u = (_delta(p) for p in (tmp_path / "o", adapters["ft"], adapters["aligned"], adapters["un"]))
    for n in D:
        expected = gamma * (a[n] - u[n])
        assert torch.allclose(D[n] - t[n], expected, atol=1e-6 * float(expected.abs().max()) + 1e-9)


def test_unaligned_equal_to_aligned_changes_nothing(adapters, tmp_path):  # (c)
    resta.resta(adapters["aligned"], adapters["ft"], adapters["aligned"], RestaConfig(gamma=1.0), tmp_path / "o")
    D, t = _delta(tmp_path / "o"), _delta(adapters["ft"])
    assert all(torch.allclose(D[n], t[n], atol=1e-6) for n in D)


def test_stacked_lora_equals_the_dense_merge(adapters, tmp_path):  # (d) and (f)
    cfg = RestaConfig(gamma=1.0)
    resta.resta(adapters["aligned"], adapters["ft"], adapters["un"], cfg, tmp_path / "o")
    base = modeling.load_model(adapters["base"], device="cpu")
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = modeling.load_adapter(base, tmp_path / "o").merge_and_unload().state_dict()
    t, a, u = adapters["w"]["t"], adapters["w"]["a"], adapters["w"]["u"]
    touched = set()
    for n in lora_modules(t):
        ka, kb = factor_keys(n)
        D = resta.dense_delta(t[ka], t[kb], a[ka], a[kb], u[ka], u[kb], adapters["s"], cfg, None)
        key = n.removeprefix("base_model.model.") + ".weight"
        expected = w0[key].double() + D
        rel = float(torch.linalg.norm(merged[key].double() - expected) / torch.linalg.norm(expected))
        assert rel < 1e-5, (key, rel)
        touched.add(key)
    untouched = [k for k in w0 if k not in touched]
    assert untouched and all(torch.equal(merged[k], w0[k]) for k in untouched)  # (f)


def test_dare_properties():  # (e)
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(200, 300, generator=g, dtype=torch.float64)
    assert torch.equal(resta.dare(tau, 0.0, torch.Generator().manual_seed(1)), tau)
    q = 0.3
    out = resta.dare(tau, q, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(1 - kept.double().mean().item() - q) < 0.01
    assert torch.allclose(out[kept], tau[kept] / (1 - q))
    assert torch.equal(out, resta.dare(tau, q, torch.Generator().manual_seed(1)))
    mean = sum(resta.dare(tau, q, torch.Generator().manual_seed(s)) for s in range(400)) / 400
    assert float((mean - tau).abs().mean()) < 0.05 * float(tau.abs().mean())


def test_dare_output_reports_its_svd_error(adapters, tmp_path):
    rep = resta.resta(adapters["aligned"], adapters["ft"], adapters["un"], RestaConfig(gamma=1.0, dare_rate=0.3),
                      tmp_path / "o")
    assert 0 < rep["svd_relative_error"] < 1 and len(rep["modules"]) == rep["n_modules"]


def test_resta_base_uses_the_aligned_delta(adapters, tmp_path):
    rep = resta.resta(adapters["aligned"], adapters["ft"], None, RestaConfig(gamma=0.5), tmp_path / "o", "resta-base")
    D, t, a = _delta(tmp_path / "o"), _delta(adapters["ft"]), _delta(adapters["aligned"])
    assert rep["rank"] == 8 and all(torch.allclose(D[n] - t[n], 0.5 * a[n], atol=1e-6) for n in D)


def test_unaligned_rows_must_be_disjoint_from_the_mix():
    with pytest.raises(ConfigError, match="realign.unaligned.source"):
        load_config(None, ["realign.baselines=[resta]", "data.poison_source=pure_bad"])
