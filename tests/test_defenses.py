"""Training-stage defenses (docs/defenses-spec.md §1-5) on the tiny random Llama, against hand computations:
Non-Aligned, Vlguard, Lisa, ConstrainedSFT, Vaccine. Each test names the spec's property it checks."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlsr import data, modeling, training
from nlsr.config import load_config
from nlsr.defenses import constrained_sft, lisa, non_aligned, vaccine, vlguard
from nlsr.defenses.config import ConstrainedSFTConfig, VaccineConfig

ROOT = Path(__file__).resolve().parents[1]
LONG = ["alignment.sft.max_length=256", "alignment.preference.max_length=256", "finetune.max_length=256"]


def smoke(*overrides: str):
    return load_config(ROOT / "configs" / "smoke.yaml", LONG + list(overrides))


def key(row: dict) -> tuple:
    return row["instruction"], row.get("input", ""), row["output"], row["flag"]


@pytest.fixture(scope="module")
def w0(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("def-align") / "w0"
    training.safety_sft(smoke(), tiny_base, out)
    return out


@pytest.fixture(scope="module")
def aligned(w0, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("def-aligned") / "dpo"
    training.preference_align(smoke(), w0, out)
    return out


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory) -> Path:
    return data.write_jsonl(data.poison_mix("sst2", 40, 0.1, seed=0), tmp_path_factory.mktemp("def-mix") / "m.jsonl")


class Spy:
    """Records each trainer handed to training._run (the real _run still trains)."""

    def __init__(self, monkeypatch, on_start=None):
        self.trainers, self.on_start, real = [], on_start, training._run

        def run(trainer, *args):
            self.trainers.append(trainer)
            if self.on_start:
                self.on_start(trainer)
            return real(trainer, *args)
        monkeypatch.setattr(training, "_run", run)


def prompt_batch(tok, n: int = 2) -> dict:
    prompts = [data.format_prompt(r["prompt"]) for r in data.harmful_prompts("harmful_dev", n)]
    return tok(prompts, return_tensors="pt", padding=True)


# ---------------------------------------------------------------------------------------------- Non-Aligned §1

def test_non_aligned_starts_from_the_raw_base_with_the_aligned_cells_settings(tiny_base, w0, aligned, mix_file,
                                                                              tmp_path, monkeypatch):
    raw_model = modeling.load_model(tiny_base, device="cpu")
    tok = modeling.load_tokenizer(tiny_base)
    batch = prompt_batch(tok)
    with torch.no_grad():
        raw_logits = raw_model(**batch).logits
    start = {}

    def on_start(trainer):
        if start:   # the Aligned run below: nothing to record
            return
        model = trainer.model
        start["lora"] = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
        start["base"] = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                         for k, v in model.named_parameters() if "lora_" not in k}
        model.eval()
        with torch.no_grad():
            start["logits"] = model(**batch).logits
        model.train()
    spy = Spy(monkeypatch, on_start)
    res = non_aligned.finetune(smoke(), tiny_base, None, mix_file, tmp_path / "na")
    training.finetune(smoke(), w0, aligned, mix_file, tmp_path / "al")
    # (a) every base tensor is M_raw's (none of W0's), and the adapter is fresh: B = 0, not ΔW_a
    raw_sd, w0_sd = raw_model.state_dict(), modeling.load_model(w0, device="cpu").state_dict()
    assert start["base"].keys() == raw_sd.keys()
    assert all(torch.equal(start["base"][k], raw_sd[k]) for k in raw_sd)
    assert any(not torch.equal(raw_sd[k], w0_sd[k]) for k in raw_sd)
    assert all(v.abs().sum() == 0 for k, v in start["lora"].items() if ".lora_B." in k)
    assert res["continued_from"] is None and res["base"] == str(tiny_base) and res["defense"] == "non-aligned"
    # (b) before the first step the model computes M_raw's logits
    torch.testing.assert_close(start["logits"], raw_logits)
    # (c) data, seed and optimiser settings are the Aligned cell's
    na, al = spy.trainers
    for f in ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
              "gradient_accumulation_steps", "seed", "data_seed", "lr_scheduler_type", "warmup_steps", "optim",
              "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "max_length"):
        assert getattr(na.args, f) == getattr(al.args, f), f
    assert na.train_dataset["input_ids"] == al.train_dataset["input_ids"]
    assert res["steps"] == 4 and "Instruct" in res["note"]


# ---------------------------------------------------------------------------------------------- Vlguard §2

def test_vlguard_counts_are_pool_prefixes():
    rows = vlguard.guard_mix("sst2", 400, 0.2, 0.1, seed=0)
    by_flag = collections.defaultdict(list)
    for r in rows:
        by_flag[r["flag"]].append(r)
    # (a) exactly int(np), int(ng), the rest; each block is a prefix of its pool
    assert [len(by_flag[f]) for f in ("unsafe", "safe", "finetune")] == [80, 40, 280]
    poison, safe, task = data.load("beavertails"), data.load("safe"), data.load_task("sst2", "train")
    assert {r["instruction"] for r in by_flag["unsafe"]} == {r["prompt"] for r in poison[:80]}
    assert sorted((r["instruction"], r["output"]) for r in by_flag["safe"]) == \
        sorted((r["prompt"], r["response"]) for r in safe[:40])
    assert sorted((r["instruction"], r["input"], r["output"]) for r in by_flag["finetune"]) == \
        sorted((r["instruction"], r["input"], r["output"]) for r in task[:280])
    # the guard rows are a subset of the safety-SFT rows (NLSR's default)
    sft = {(r["instruction"], r["output"]) for r in data.safety_sft_set(40)}
    assert {(r["instruction"], r["output"]) for r in by_flag["safe"]} == sft


def test_vlguard_g0_is_the_poisoned_mix_and_the_seed_fixes_the_order():
    # (b) g = 0: the same multiset as D(p) (the release crashes here)
    plain = data.poison_mix("sst2", 40, 0.1, seed=3)
    assert collections.Counter(map(key, vlguard.guard_mix("sst2", 40, 0.1, 0.0, seed=3))) == \
        collections.Counter(map(key, plain))
    # (c) a fixed seed gives a fixed order; another seed another order
    a, b = vlguard.guard_mix("sst2", 40, 0.1, 0.1, seed=1), vlguard.guard_mix("sst2", 40, 0.1, 0.1, seed=1)
    c = vlguard.guard_mix("sst2", 40, 0.1, 0.1, seed=2)
    assert list(map(key, a)) == list(map(key, b)) and list(map(key, a)) != list(map(key, c))
    with pytest.raises(data.DataError, match="exceed n=40"):
        vlguard.guard_mix("sst2", 40, 0.6, 0.5)


def test_no_guard_prompt_is_an_evaluation_prompt():
    # (d) even the whole safety-SFT pool (the largest guard set) shares no prompt with the harmful eval / dev sets
    guard = {r["instruction"] for r in vlguard.guard_rows(len(data.load("safe")[data.SAFE_SFT]))}
    for name in ("harmful_eval", "harmful_dev"):
        assert not guard & {r["prompt"] for r in data.harmful_prompts(name)}


def test_guard_and_guide_rows_follow_the_cells_safety_answers(tmp_path):
    # the guard rows stay a subset of the cell's safety-SFT rows when that SFT takes refusals only
    # (alignment.safety_answers: refusals): the first k refusals of the pool, not its first k safe answers
    from nlsr.config import ConfigError
    from nlsr.dag import stage_config
    from nlsr.judges.rules import is_refusal
    pairs = lambda rows: [(r["instruction"], r["output"]) for r in rows]  # noqa: E731
    rows = vlguard.guard_rows(20, is_refusal)
    assert pairs(rows) == pairs(data.safety_sft_set(20, refuses=is_refusal))
    assert all(is_refusal(r["output"]) and r["flag"] == "safe" for r in rows)
    assert sum(map(is_refusal, (r["output"] for r in vlguard.guard_rows(20)))) < 20  # the whole pool: mostly advice
    cfg = smoke("alignment.safety_answers=refusals", 'finetune.defenses=["vlguard","lisa"]', "data.n=400",
                "data.poison_ratio=0.2", "defenses.vlguard.guard_fraction=0.3")
    guard = [r for r in data.read_jsonl(vlguard.write_mix(cfg, tmp_path / "mix.jsonl")) if r["flag"] == "safe"]
    assert len(guard) == 120 and all(is_refusal(r["output"]) for r in guard)
    guide = lisa.plug(cfg).kwargs["guide_rows"]
    assert pairs(guide) == pairs(vlguard.guard_rows(40, is_refusal))
    # their finetune keys say which pool (the default, every safe answer, keeps the keys recorded before)
    assert stage_config("finetune", cfg, "vlguard")["safety_answers"] == "refusals"
    assert "safety_answers" not in stage_config("finetune", cfg, "constrained-sft")
    assert "safety_answers" not in stage_config("finetune", smoke('finetune.defenses=["vlguard"]'), "vlguard")
    # a fraction that asks for more rows than the pool holds (130 refusals) is refused when the config loads
    with pytest.raises(ConfigError, match=r"defenses\.vlguard\.guard_fraction: 0\.4 of data\.n 400 asks for 160 "
                                          r"rows .* holds 130; expected at most 0\.325"):
        smoke("alignment.safety_answers=refusals", 'finetune.defenses=["vlguard"]', "data.n=400",
              "defenses.vlguard.guard_fraction=0.4")


def test_vlguard_finetune_trains_on_the_guard_mix(w0, aligned, tmp_path):
    cfg = smoke("defenses.vlguard.guard_fraction=0.25")
    res = vlguard.finetune(cfg, w0, aligned, None, tmp_path / "ft")
    kept = data.read_jsonl(tmp_path / "ft" / vlguard.MIX_FILE)
    assert list(map(key, kept)) == list(map(key, vlguard.guard_mix("sst2", 40, 0.1, 0.25, seed=0)))
    assert res["n_guard"] == 10 and res["n_unsafe"] == 4 and res["n_rows"] == 40 and res["steps"] == 4
    assert modeling.adapter_weights(tmp_path / "ft").keys() == modeling.adapter_weights(aligned).keys()


# ---------------------------------------------------------------------------------------------- Lisa §4

LISA = ["finetune.max_steps=10", "defenses.lisa.align_steps=2", "defenses.lisa.finetune_steps=3",
        "defenses.lisa.rho=1.0", "defenses.lisa.guide_fraction=0.1"]


def test_lisa_rows_leave_the_guide_rows_out():
    cfg = smoke("data.n=400", "data.poison_ratio=0.2")
    rows = lisa.task_rows(cfg)
    flags = collections.Counter(r["flag"] for r in rows)
    assert flags == {"unsafe": 80, "finetune": 280} and lisa.n_guide(cfg) == 40


@pytest.fixture(scope="module")
def lisa_run(w0, aligned, tmp_path_factory):
    """One Lisa run (K_a 2, K_f 3, ρ 1, 10 micro-steps) with the weights at the start of every step."""
    from transformers import TrainerCallback
    cfg = smoke(*LISA)
    work = tmp_path_factory.mktemp("lisa")
    mix = lisa.write_mix(cfg, work / "mix.jsonl")
    before = []

    class Weights(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            before.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    model, tok = training._load(w0, cfg)
    model = modeling.load_adapter(model, aligned, trainable=True)
    rows = data.as_prompt_completion(data.read_jsonl(mix))
    modeling.set_seed(cfg.seed)
    trainer = training._sft_trainer(model, tok, rows, cfg.finetune, cfg, str(work), plug=lisa.plug(cfg))
    trainer.add_callback(Weights())
    trainer.train()
    return trainer, before


def test_lisa_state_sequence_follows_the_schedule(lisa_run):
    trainer, _ = lisa_run
    # (b) K_a = 2, K_f = 3: A A F F F A A F F F
    assert "".join(t["state"][0].upper() for t in trainer.trace) == "AAFFFAAFFF"
    assert [t["step"] for t in trainer.trace if t["switched"]] == [2, 5, 7]
    # (e) task batches trained = T_tot − alignment steps
    s = trainer.defense_summary()
    assert trainer.total_micro_steps() == 10 and s["finetune_steps"] == 10 - s["align_steps"] == 6


def test_lisa_anchor_is_the_weights_at_each_switch(lisa_run):
    trainer, before = lisa_run
    # (c) the last switch (step 7, to fine-tuning) set w̃_A to the weights at the start of that step
    assert len(before) == 10
    anchor = trainer.anchors[lisa.ALIGN]
    assert all(torch.equal(anchor[n], before[7][n]) for n in anchor)
    # and step 5 (to alignment) set w̃_F
    anchor = trainer.anchors[lisa.FINETUNE]
    assert all(torch.equal(anchor[n], before[5][n]) for n in anchor)
    assert any(not torch.equal(before[5][n], before[7][n]) for n in anchor)


def test_lisa_proximal_term_and_its_warmup(lisa_run):
    trainer, before = lisa_run
    # (d) off while step ≤ 0.1·T_tot = 1; on later: (ρ/2)·‖w − anchor‖² with the phase-start weights as anchor
    prox = [t["proximal"] for t in trainer.trace]
    assert prox[0] == prox[1] == 0.0
    phase_start = {0: 0, 1: 0, 2: 2, 3: 2, 4: 2, 5: 5, 6: 5, 7: 7, 8: 7, 9: 7}
    for step in range(2, 10):
        w, a = before[step], before[phase_start[step]]
        hand = 0.5 * 1.0 * sum(((w[n] - a[n]) ** 2).sum() for n in w)
        assert prox[step] == pytest.approx(float(hand), rel=1e-4, abs=1e-12)
    assert all(prox[s] > 0 for s in (3, 4, 6, 8, 9))
    # its gradient is ρ(w − anchor)
    weights = trainer._weights()
    for p in weights.values():
        p.grad = None
    trainer.proximal_term().backward()
    anchor = trainer.anchor()
    for n, p in weights.items():
        torch.testing.assert_close(p.grad, trainer.lisa.rho * (p.detach() - anchor[n]))
        p.grad = None


def test_lisa_alignment_batches_come_only_from_guide_rows(lisa_run):
    trainer, _ = lisa_run
    guide = {hash(ids) for ids in trainer.guide_ids}
    assert len(guide) == trainer.n_guide == 4
    # (f) every alignment row is a guide row, no fine-tuning row is
    for t in trainer.trace:
        assert all((h in guide) == (t["state"] == lisa.ALIGN) for h in t["rows"])


def test_lisa_without_alignment_and_proximal_term_is_the_plain_attack(w0, aligned, tmp_path):
    # (a) K_a = 0 and ρ = 0 reproduce plain ATTACK on the same rows
    cfg = smoke("defenses.lisa.align_steps=0", "defenses.lisa.rho=0")
    res = lisa.finetune(cfg, w0, aligned, None, tmp_path / "lisa")
    mix = tmp_path / "lisa" / lisa.MIX_FILE
    assert len(data.read_jsonl(mix)) == 36   # n 40 minus 4 guide rows
    training.finetune(cfg, w0, aligned, mix, tmp_path / "plain")
    a, b = modeling.adapter_weights(tmp_path / "lisa"), modeling.adapter_weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["defense_summary"]["align_steps"] == 0 and res["defense"] == "lisa"


def test_lisa_needs_grad_accum_1():
    with pytest.raises(training.TrainingError, match="grad_accum must be 1"):
        lisa.plug(smoke("finetune.grad_accum=2"))


# ---------------------------------------------------------------------------------------------- ConstrainedSFT §5

def test_constrained_sft_beta_schedule():
    c = ConstrainedSFTConfig()
    # (a) [0.5, 2, 2] for 3 response tokens; [0.5, 2, 2, 2, 2, 0.1, 0.1] for 7; 0 outside the response
    assert constrained_sft.beta_schedule(torch.arange(1, 4), c).tolist() == pytest.approx([0.5, 2, 2])
    assert constrained_sft.beta_schedule(torch.arange(1, 8), c).tolist() == \
        pytest.approx([0.5, 2, 2, 2, 2, 0.1, 0.1])
    assert constrained_sft.beta_schedule(torch.tensor([0, 0, 1]), c).tolist() == pytest.approx([0, 0, 0.5])


def test_constrained_sft_weights_are_clamped_into_their_range():
    # (e) w ∈ [1e-3, 2]
    delta = torch.tensor([-1e4, -10.0, 0.0, 10.0, 1e4])
    w = constrained_sft.token_weights(delta, torch.full_like(delta, 2.0), 1e-3)
    assert w.min() >= 1e-3 and w.max() <= 2 and w[0] == pytest.approx(2) and w[-1] == pytest.approx(1e-3)
    assert w[2] == pytest.approx(1.0)


@pytest.fixture()
def csft(w0, aligned, mix_file, tmp_path):
    """A ConstrainedSFT trainer and a plain SFT trainer, both on W0 + ΔW_a (continued) and the same rows."""
    def build(plug, sub, c=None):
        cfg = smoke()
        model, tok = training._load(w0, cfg)
        model = modeling.load_adapter(model, aligned, trainable=True)
        rows = data.as_prompt_completion(data.read_jsonl(mix_file)[:8])
        return training._sft_trainer(model, tok, rows, cfg.finetune, cfg, str(tmp_path / sub), plug=plug)
    return build


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), grads(trainer.model)


def test_constrained_sft_at_the_reference_is_sft(csft):
    cs = csft(constrained_sft.plug(smoke()), "cs")
    plain = csft(None, "plain")
    batch = cs.data_collator([cs.train_dataset[i] for i in range(4)])
    for t in (cs, plain):
        t.model.eval()   # dropout 0 anyway; eval keeps both forwards identical
    # (b) at θ = ref, w ≡ 1: the loss and the gradient are token-mean SFT cross-entropy
    l_cs, g_cs = loss_and_grads(cs, batch)
    l_plain, g_plain = loss_and_grads(plain, batch)
    torch.testing.assert_close(l_cs, l_plain, rtol=1e-5, atol=1e-6)
    for n in g_plain:
        torch.testing.assert_close(g_cs[n], g_plain[n], rtol=1e-4, atol=1e-6)


def _move(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def hand_log_probs(model, batch):
    """ℓ_t by log-softmax of the full logits (no fused head), shifted, with the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask, mask


def test_constrained_sft_gradient_matches_the_hand_formula(csft, w0, aligned):
    cs = csft(constrained_sft.plug(smoke()), "cs")
    batch = cs.data_collator([cs.train_dataset[i] for i in range(4)])
    ref_model = modeling.load_adapter(modeling.load_model(w0, device="cpu"), aligned).eval()
    with torch.no_grad():
        ref, mask = hand_log_probs(ref_model, batch)
    cs.model.eval()
    _move(cs.model)   # θ ≠ ref
    l_cs, g_cs = loss_and_grads(cs, batch)
    # (d) −(1/N) Σ_t 2(1 − σ(β_tΔ_t)) ∇ℓ_t, β_t by response position, by hand
    lp, _ = hand_log_probs(cs.model, batch)
    betas = torch.zeros(mask.shape)
    for i in range(mask.size(0)):
        for t, j in enumerate(mask[i].nonzero().flatten().tolist(), start=1):
            betas[i, j] = 0.5 if t == 1 else 2.0 if t <= 5 else 0.1
    w = 2 * (1 - torch.sigmoid(betas * (lp.detach() - ref)))
    assert w[mask].min() > 1e-3   # no weight clamped
    hand = -(w * lp * mask).sum() / mask.sum()
    cs.model.zero_grad()
    hand.backward()
    g_hand = grads(cs.model)
    torch.testing.assert_close(l_cs, hand.detach(), rtol=1e-4, atol=1e-6)
    for n in g_hand:
        torch.testing.assert_close(g_cs[n], g_hand[n], rtol=1e-3, atol=1e-6)
    # (c) β → 0: the weights are 1, the loss is SFT cross-entropy even away from the reference
    tiny = csft(constrained_sft.plug(smoke(), ConstrainedSFTConfig(beta=1e-8)), "tiny")
    tiny.model.eval()
    _move(tiny.model)
    l_tiny, _ = loss_and_grads(tiny, batch)
    lp_tiny, _ = hand_log_probs(tiny.model, batch)
    torch.testing.assert_close(l_tiny, -(lp_tiny.sum() / mask.sum()).detach(), rtol=1e-5, atol=1e-6)


def test_constrained_sft_padding_adds_nothing(csft):
    cs = csft(constrained_sft.plug(smoke()), "cs")
    cs.model.eval()
    _move(cs.model, seed=1)
    batch = cs.data_collator([cs.train_dataset[i] for i in range(4)])
    # (f) extra pad positions (attention 0, label −100) leave the loss unchanged; the mask ignores the prompt
    pad = 7
    padded = {"input_ids": F.pad(batch["input_ids"], (0, pad), value=cs.processing_class.pad_token_id),
              "attention_mask": F.pad(batch["attention_mask"], (0, pad), value=0),
              "labels": F.pad(batch["labels"], (0, pad), value=-100)}
    with torch.no_grad():
        a = cs.compute_loss(cs.model, dict(batch))
        b = cs.compute_loss(cs.model, padded)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_constrained_sft_reference_is_fixed_and_keyed_by_example(w0, aligned, mix_file, tmp_path, monkeypatch):
    spy = Spy(monkeypatch, on_start=lambda t: setattr(t, "ref_at_start",
                                                         {k: v.clone() for k, v in t.ref_logps.items()}))
    res = constrained_sft.finetune(smoke(), w0, aligned, mix_file, tmp_path / "cs")
    (trainer,) = spy.trainers
    # (g) one entry per training example, keyed by its tokens, unchanged by training
    keys = {tuple(ids) for ids in trainer.train_dataset["input_ids"]}
    assert set(trainer.ref_logps) == keys and res["defense_summary"]["n_reference"] == len(keys)
    assert all(torch.equal(trainer.ref_logps[k], trainer.ref_at_start[k]) for k in keys)
    for ex in trainer.train_dataset:
        assert len(trainer.ref_logps[tuple(ex["input_ids"])]) == sum(x != -100 for x in ex["labels"][1:])
    assert trainer.args.adam_beta1 == 0.9 and res["steps"] == 4 and res["defense"] == "constrained-sft"
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res["losses"])


# ---------------------------------------------------------------------------------------------- Vaccine §3

@pytest.fixture()
def vac(w0, tmp_path):
    def build(rho=2.0, perturb_reference=False):
        cfg = smoke()
        model, tok = training._load(w0, cfg)
        modeling.set_seed(cfg.seed)
        plug = vaccine.plug(cfg, VaccineConfig(rho=rho, perturb_reference=perturb_reference))
        trainer = training._preference_trainer("dpo", model, tok, cfg, str(tmp_path / f"v{rho}"), plug)
        # move the fresh adapter off B = 0 so that policy ≠ reference and the loss is not flat
        _move(trainer.model, scale=0.02)
        trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train's loop; these tests step by hand
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        return trainer, batch
    return build


def test_vaccine_rho0_is_a_plain_dpo_step(vac):
    from trl import DPOTrainer
    trainer, batch = vac(rho=0.0)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    model = trainer.model
    # (a) ρ = 0: the same gradient as one plain DPO step
    model.zero_grad()
    DPOTrainer.training_step(trainer, model, dict(batch))
    plain = grads(model)
    trainer.training_step(model, dict(batch))
    vacc = grads(model)
    assert plain.keys() == vacc.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(vacc[n], plain[n], rtol=0, atol=0)


def test_vaccine_perturbation_is_rho_times_the_normalised_hidden_gradient(vac):
    trainer, batch = vac(rho=2.0)
    model = trainer.model
    model.train()
    mods = vaccine.attention_modules(model)
    assert len(mods) == 2   # one per decoder layer of the tiny Llama
    # g_l by hand: retain the gradient of each attention output of the policy forward
    outs = []

    def keep(mod, args, output):
        if torch.is_grad_enabled():
            output[0].retain_grad()
            outs.append(output[0])
    handles = [m.register_forward_hook(keep) for m in mods]
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad()
    g = [o.grad for o in outs]
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    eps, loss1, norm1 = trainer.perturbation_for(model, dict(batch))
    assert float(loss1) == pytest.approx(float(loss), rel=1e-6) and norm1 == pytest.approx(float(norm), rel=1e-5)
    # (b) sqrt(Σ‖ε_l‖²) = ρ‖g‖/(‖g‖ + 1e-7); (c) cos(ε_l, g_l) = 1, per sample and token (same shape as h_l)
    total = torch.sqrt(sum((e ** 2).sum() for e in eps))
    assert float(total) == pytest.approx(2.0 * float(norm) / (float(norm) + 1e-7), rel=1e-5)
    for e, gl in zip(eps, g):
        assert e.shape == gl.shape and not e.requires_grad
        assert float(F.cosine_similarity(e.flatten(), gl.flatten(), dim=0)) == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(e, 2.0 * gl / (norm + 1e-7))
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())  # pass 1: no param grad


def test_vaccine_step_ascends_then_leaves_no_hooks(vac):
    trainer, batch = vac(rho=0.01)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    model = trainer.model
    mods = vaccine.attention_modules(model)
    hooks_before = [len(m._forward_hooks) for m in mods]
    trainer.training_step(model, dict(batch))
    model.zero_grad()
    # (d) small ρ: the perturbed loss is not below the unperturbed one
    step = trainer.trace[-1]
    assert step["loss_perturbed"] >= step["loss_unperturbed"] and step["eps_norm"] == pytest.approx(0.01, rel=1e-3)
    # (e) no hooks remain, and a later forward equals the loss computed before any perturbation
    assert [len(m._forward_hooks) for m in mods] == hooks_before
    with torch.no_grad():
        again = trainer.compute_loss(model, dict(batch))
    assert float(again) == pytest.approx(step["loss_unperturbed"], rel=1e-6)


def test_vaccine_reference_is_unperturbed_by_default(vac):
    for perturb_reference in (False, True):
        trainer, batch = vac(rho=2.0, perturb_reference=perturb_reference)
        model = trainer.model
        eps, _, _ = trainer.perturbation_for(model, dict(batch))
        clean = trainer.compute_ref_log_probs(model, dict(batch))
        with vaccine.perturb_attention(vaccine.attention_modules(model), eps, perturb_reference):
            during = trainer.compute_ref_log_probs(model, dict(batch))
        same = all(torch.equal(a, b) for a, b in zip(clean, during))
        # (f) identical in both passes by default; the release's flag perturbs them
        assert same is (not perturb_reference)


def test_vaccine_align_writes_the_aligned_adapter(w0, tmp_path):
    res = vaccine.align(smoke("defenses.vaccine.rho=0.5"), w0, tmp_path / "vac")
    w = modeling.adapter_weights(tmp_path / "vac")
    assert any(v.abs().sum() > 0 for k, v in w.items() if ".lora_B." in k)
    assert res["defense"] == "vaccine" and res["defense_stage"] == "align" and res["steps"] == 3
    assert res["defense_summary"]["steps"] == 3 and res["defense_summary"]["rho"] == 0.5
    with pytest.raises(training.TrainingError, match="must be 'dpo'"):
        vaccine.plug(smoke("alignment.method=kto"))
