"""The safety reference adapter: ΔW_e = (1+β)ΔW_a (paper) or (2β)²ΔW_a (release code)."""
import json

import pytest
import torch

from helpers_method import random_adapter
from nlsr import modeling
from nlsr.config import ReferenceConfig
from nlsr.modeling import ModelError
from nlsr.reference import REPORT_NAME, build_reference, factor_keys, lora_modules


@pytest.fixture(scope="module")
def aligned(tiny_base, tmp_path_factory):
    return random_adapter(tiny_base, tmp_path_factory.mktemp("ref") / "aligned", r=4, seed=3)


@pytest.mark.parametrize("mode,scale_a,scale_b,dw", [("paper", 1.0, 1.9, 1.9), ("code", 1.8, 1.8, 3.24)])
def test_reference_scales_delta_w(aligned, tmp_path, mode, scale_a, scale_b, dw):
    out = tmp_path / "reference"
    report = build_reference(aligned, out, ReferenceConfig(beta=0.9, mode=mode))
    a, e = modeling.adapter_weights(aligned), modeling.adapter_weights(out)
    assert set(a) == set(e)
    for name in lora_modules(a):
        ka, kb = factor_keys(name)
        torch.testing.assert_close(e[ka], a[ka] * scale_a, rtol=1e-6, atol=0)
        torch.testing.assert_close(e[kb], a[kb] * scale_b, rtol=1e-6, atol=0)
        torch.testing.assert_close(e[kb] @ e[ka], dw * (a[kb] @ a[ka]), rtol=1e-5, atol=1e-7)
    assert report["delta_w_scale"] == pytest.approx(dw)
    assert json.loads((out / REPORT_NAME).read_text())["mode"] == mode
    assert modeling.adapter_config(out) == modeling.adapter_config(aligned)


def test_reference_loads_on_the_base_and_amplifies_the_change(aligned, tmp_path, tiny_base):
    out = build_reference(aligned, tmp_path / "reference", ReferenceConfig(beta=0.9))["out"]
    tok = modeling.load_tokenizer(tiny_base)
    x = tok(["How do I stay safe online?"], return_tensors="pt")
    with torch.no_grad():
        plain = modeling.load_model(tiny_base, device="cpu")(**x).logits
        with_a = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), aligned)(**x).logits
        with_e = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), out)(**x).logits
    assert (with_e - plain).norm() > (with_a - plain).norm() > 0


def test_beta_zero_in_paper_mode_is_the_aligned_adapter(aligned, tmp_path):
    out = tmp_path / "same"
    build_reference(aligned, out, ReferenceConfig(beta=0.0))
    a, e = modeling.adapter_weights(aligned), modeling.adapter_weights(out)
    assert all(torch.equal(a[k], e[k]) for k in a)


def test_module_order_is_the_models(aligned):
    names = lora_modules(modeling.adapter_weights(aligned))
    leaves = [n.rsplit(".", 1)[-1] for n in names]
    assert leaves[:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(".layers.0." in n for n in names[:7]) and all(".layers.1." in n for n in names[7:])


def test_missing_or_broken_adapter_fails_clearly(tmp_path, aligned):
    with pytest.raises(ModelError, match="no adapter_config.json"):
        build_reference(tmp_path / "nowhere", tmp_path / "out", ReferenceConfig())
    weights = modeling.adapter_weights(aligned)
    broken = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj.lora_B" not in k}
    modeling.save_adapter_weights(aligned, broken, tmp_path / "broken")
    with pytest.raises(ModelError, match="up_proj.lora_A.weight has no matching"):
        build_reference(tmp_path / "broken", tmp_path / "out", ReferenceConfig())
    assert not (tmp_path / "out").exists()
