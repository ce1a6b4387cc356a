"""Training stages on the tiny random Llama (configs/smoke.yaml sizes): SFT → W0, every preference method,
harmful fine-tuning that continues the aligned adapter, response-only loss, determinism, clear errors."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nlsr import data, modeling, packing, training
from nlsr.config import ConfigError, load_config
from nlsr.registry import UnknownMethod

ROOT = Path(__file__).resolve().parents[1]
# The tiny tokenizer spends ~100 tokens on the Alpaca prompt: smoke.yaml's 64 would truncate every response away.
LONG = ["alignment.sft.max_length=256", "alignment.preference.max_length=256", "finetune.max_length=256"]


def smoke(*overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml", LONG + list(overrides))


def with_method(cfg, method: str):
    return cfg.model_copy(update={"alignment": cfg.alignment.model_copy(update={"method": method})})


def lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return modeling.adapter_weights(folder)


@pytest.fixture(scope="module")
def w0(tiny_base, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("align") / "w0"
    return out, training.safety_sft(smoke(), tiny_base, out)


@pytest.fixture(scope="module")
def aligned(w0, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aligned") / "dpo"
    training.preference_align(smoke(), w0[0], out)
    return out


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory) -> Path:
    return data.write_jsonl(data.poison_mix("sst2", 40, 0.1, seed=0), tmp_path_factory.mktemp("mix") / "mix.jsonl")


# ---------------------------------------------------------------------------------------------- alignment

def test_safety_sft_merges_into_w0_and_keeps_the_adapter(w0, tiny_base):
    folder, metrics = w0
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert (folder / training.SFT_ADAPTER / "adapter_model.safetensors").is_file()
    assert training.raw_base_of(folder) == tiny_base
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4 and metrics["wall_s"] > 0
    assert all(isinstance(s, int) and isinstance(v, float) for s, v in metrics["losses"])
    # W0 = base + ΔW_sft: the merged weights moved, and equal base + the saved adapter
    base_w = modeling.load_model(tiny_base, device="cpu").state_dict()
    w0_w = modeling.load_model(folder, device="cpu").state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_w[key], w0_w[key])
    rebuilt = modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"),
                                    folder / training.SFT_ADAPTER).merge_and_unload().state_dict()
    torch.testing.assert_close(rebuilt[key], w0_w[key])


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "simpo"])
def test_every_preference_method_trains_an_adapter(method, w0, tmp_path):
    cfg = with_method(smoke(), method)
    metrics = training.preference_align(cfg, w0[0], tmp_path / method)
    weights = lora_tensors(tmp_path / method)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    # B starts at zero: a trained adapter has moved it
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".lora_B." in k)
    assert not (tmp_path / method / "ref").exists()  # no reference-adapter copy saved alongside
    assert metrics["method"] == method and metrics["base"] == str(w0[0]) and metrics["steps"] == 3
    assert len(metrics["losses"]) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in metrics["losses"])
    info = json.loads((tmp_path / method / "nlsr_adapter.json").read_text())
    assert info["method"] == method and info["base"] == str(w0[0])


def test_sft_method_is_the_sft_adapter_on_the_raw_base(w0, tiny_base, tmp_path):
    cfg = with_method(smoke(), "sft")
    metrics = training.preference_align(cfg, w0[0], tmp_path / "sft")
    assert metrics["base"] == str(tiny_base) and training.aligned_base(cfg, w0[0]) == tiny_base
    src, copy = lora_tensors(w0[0] / training.SFT_ADAPTER), lora_tensors(tmp_path / "sft")
    assert src.keys() == copy.keys() and all(torch.equal(src[k], copy[k]) for k in src)
    assert training.aligned_base(smoke(), w0[0]) == w0[0]  # dpo: the adapter belongs on W0


def test_sft_loss_is_on_response_tokens_only(tiny_base):
    cfg = smoke("alignment.sft.max_length=1024")  # no truncation: every row keeps its EOS
    model, tok = training._load(tiny_base, cfg)
    rows = data.as_prompt_completion(data.safety_sft_set(4))
    with tempfile.TemporaryDirectory() as work:
        trainer = training._sft_trainer(model, tok, rows, cfg.alignment.sft, cfg, work,
                                        peft_config=training._fresh_lora(model, cfg))
    for row, ex in zip(rows, trainer.train_dataset):
        n_prompt = len(tok(row["prompt"])["input_ids"])
        labels, ids = ex["labels"], ex["input_ids"]
        assert all(x == -100 for x in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id  # EOS appended, trained on
        assert tok.decode(ids[n_prompt:-1]) == row["completion"]
    # the trainer's loss equals a hand-computed mean NLL over response tokens only
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                               ignore_index=-100)
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)


def test_preference_completions_end_with_eos(w0):
    cfg = smoke()
    model, tok = training._load(w0[0], cfg)
    with tempfile.TemporaryDirectory() as work:
        trainer = training._preference_trainer("dpo", model, tok, cfg, work)
    ex = trainer.train_dataset[0]
    assert ex["chosen_ids"][-1] == tok.eos_token_id and ex["rejected_ids"][-1] == tok.eos_token_id
    assert tok.eos_token_id not in ex["prompt_ids"]


# ---------------------------------------------------------------------------------------------- fine-tuning

def test_finetune_continues_the_aligned_adapter(w0, aligned, mix_file, tmp_path, monkeypatch):
    seen = {}
    real_run = training._run

    def spy(trainer, *args):  # the adapter's values when training starts
        seen.update({k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k})
        seen["trainable"] = sum(p.requires_grad for k, p in trainer.model.named_parameters() if "lora_" in k)
        return real_run(trainer, *args)

    monkeypatch.setattr(training, "_run", spy)
    metrics = training.finetune(smoke(), w0[0], aligned, mix_file, tmp_path / "ft")
    before, after = lora_tensors(aligned), lora_tensors(tmp_path / "ft")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    start = {k.replace(".default", ""): v for k, v in seen.items() if k != "trainable"}
    assert start.keys() == before.keys() and all(torch.equal(start[k], before[k]) for k in before)
    assert seen["trainable"] == len(before)
    assert metrics["continued_from"] == str(aligned) and metrics["n_rows"] == 40 and metrics["n_unsafe"] == 4
    assert metrics["steps"] == 4 and len(metrics["losses"]) == 4


def test_finetune_without_adapter_is_a_fresh_lora(tiny_base, mix_file, tmp_path):
    metrics = training.finetune(smoke(), tiny_base, None, mix_file, tmp_path / "ft")
    assert metrics["continued_from"] is None and lora_tensors(tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "nlsr_adapter.json").read_text())["continued_from"] is None


def test_same_seed_same_adapter(w0, tiny_base, tmp_path):
    training.safety_sft(smoke(), tiny_base, tmp_path / "again")
    first = lora_tensors(w0[0] / training.SFT_ADAPTER)
    second = lora_tensors(tmp_path / "again" / training.SFT_ADAPTER)
    assert all(torch.equal(first[k], second[k]) for k in first)
    training.safety_sft(smoke("seed=1"), tiny_base, tmp_path / "other")
    third = lora_tensors(tmp_path / "other" / training.SFT_ADAPTER)
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_a_padding_free_batch_has_the_padded_batch_loss_on_fewer_tokens(embedded_base, mix_file):
    """finetune.padding_free feeds a batch as one sequence of its rows: on the real SmolLM2 (whose predictions
    depend on the context, unlike the tiny random model's) the loss is the padded batch's, so each row attends
    only to itself; with positions running on across rows it would not be."""
    cfg = load_config(ROOT / "configs" / "default.yaml", ["finetune.padding_free=true"])  # the default's value too
    rows = data.as_prompt_completion(data.read_jsonl(mix_file))
    model, tok = training._load(embedded_base, cfg)
    with tempfile.TemporaryDirectory() as work:
        free = training._sft_trainer(model, tok, rows, cfg.finetune, cfg, work,
                                     peft_config=training._fresh_lora(model, cfg))
    examples = [free.train_dataset[i] for i in range(8)]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of different lengths: padding in the batch
    with tempfile.TemporaryDirectory() as work:
        padded = training._sft_trainer(model, tok, rows, cfg.finetune.model_copy(update={"padding_free": False}), cfg,
                                       work).data_collator(examples)
    packed = free.data_collator(examples)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    assert padded["input_ids"].numel() > packed["input_ids"].numel() and "attention_mask" not in packed
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    free.model.eval()
    with torch.no_grad():
        loss = {name: free.compute_loss(free.model, dict(b)).item() for name, b in
                (("packed", packed), ("padded", padded), ("leaky", leaky))}
    assert loss["packed"] == pytest.approx(loss["padded"], rel=1e-5)
    assert abs(loss["leaky"] - loss["padded"]) > 0.05


def test_padding_free_fine_tuning_follows_the_padded_losses(tiny_base, mix_file, tmp_path):
    a = training.finetune(smoke(), tiny_base, None, mix_file, tmp_path / "padded")
    b = training.finetune(smoke("finetune.padding_free=true"), tiny_base, None, mix_file, tmp_path / "free")
    assert (a["padding_free"], b["padding_free"]) == (False, True)
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "simpo"])
def test_padding_free_preference_training_follows_the_padded_losses(w0, method, tmp_path, monkeypatch):
    """alignment.preference.padding_free packs each padded batch as it enters the decoder: every preference
    method's losses are the padded run's (to float noise) and so is the adapter it trains."""
    packed_rows = []
    row_lengths = packing.row_lengths
    monkeypatch.setattr(packing, "row_lengths", lambda pos: packed_rows.append(row_lengths(pos)) or packed_rows[-1])
    runs = {}
    for free in ("false", "true"):
        runs[free] = training.preference_align(with_method(smoke(f"alignment.preference.padding_free={free}"), method),
                                               w0[0], tmp_path / f"{method}-{free}")
        if free == "false":
            assert packed_rows == []  # padded: no packed sequence reaches the attention
    assert any(lengths and len(lengths) > 1 for lengths in packed_rows)  # the rows of a batch, attended one by one
    assert (runs["false"]["padding_free"], runs["true"]["padding_free"]) == (False, True)
    torch.testing.assert_close(torch.tensor(runs["true"]["losses"]), torch.tensor(runs["false"]["losses"]),
                               rtol=1e-4, atol=1e-5)
    padded, packed = (lora_tensors(tmp_path / f"{method}-{free}") for free in ("false", "true"))
    assert any(not torch.equal(padded[k], torch.zeros_like(padded[k])) for k in padded if "lora_B" in k)
    for k in padded:
        torch.testing.assert_close(packed[k], padded[k], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_unknown_method_fails_clearly(w0, tmp_path):
    with pytest.raises(ConfigError, match="alignment.method"):
        smoke("alignment.method=ppo")
    cfg = smoke()
    bad = cfg.model_copy(update={"alignment": cfg.alignment.model_copy(update={"method": "ppo"})})
    with pytest.raises(UnknownMethod, match=r"unknown alignment method 'ppo' \(alignment.method\); expected one of \['dpo'"):
        training.preference_align(bad, w0[0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_empty_mix_fails_clearly(tiny_base, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(data.DataError, match="holds no rows"):
        training.finetune(smoke(), tiny_base, None, tmp_path / "empty.jsonl", tmp_path / "ft")
    with pytest.raises(data.DataError, match="does not exist"):
        training.finetune(smoke(), tiny_base, None, tmp_path / "missing.jsonl", tmp_path / "ft")


def test_prompts_longer_than_max_length_fail_clearly(tiny_base, tmp_path):
    short = ["alignment.sft.max_length=64", "alignment.preference.max_length=64"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", short)  # 64 < the tiny tokenizer's Alpaca prompt (~100)
    with pytest.raises(training.TrainingError, match="raise max_length"):
        training.safety_sft(cfg, tiny_base, tmp_path / "w0")
    assert not (tmp_path / "w0").exists()
    for method in ("dpo", "kto"):
        with pytest.raises(training.TrainingError, match="raise max_length"):
            training.preference_align(with_method(cfg, method), tiny_base, tmp_path / method)


def test_adapter_for_another_base_fails_clearly(w0, aligned, mix_file, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(aligned, bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    weights = {k: torch.cat([v, v[:, :1]], dim=1) if ".lora_A." in k else v for k, v in weights.items()}
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(modeling.ModelError, match="another base"):
        training.finetune(smoke(), w0[0], bad, mix_file, tmp_path / "ft")
    with pytest.raises(modeling.ModelError, match="not a LoRA adapter"):
        training.finetune(smoke(), w0[0], tmp_path, mix_file, tmp_path / "ft")
