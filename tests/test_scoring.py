"""Safety-critical neuron recognition: the streaming Gram projection is the release's ActSVD projection, exactly."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of the repo, not installed
from benchmarks.scoring import release_lowrank  # noqa: E402
from helpers_method import calibration_rows, random_adapter  # noqa: E402
from nlsr import modeling, scoring  # noqa: E402
from nlsr.config import ScoringConfig  # noqa: E402
from nlsr.data import format_prompt  # noqa: E402
from nlsr.scoring import ScoringError, keep_mask, load_masks, project_factors, score_neurons  # noqa: E402

# Streaming (float64 Gram of float32 activations, exact eigendecomposition) vs materialised activations with an
# exact float64 SVD: the projected factors agree to float32 round-off.
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    return random_adapter(tiny_base, tmp_path_factory.mktemp("score") / "reference", r=4, seed=5, scale=0.3)


@pytest.fixture(scope="module")
def samples(tiny_base):
    tok = modeling.load_tokenizer(tiny_base)
    return scoring.encode_calibration(tok, calibration_rows(5), max_length=24)


def _model(tiny_base, adapter):
    return modeling.load_adapter(modeling.load_model(tiny_base, device="cpu"), adapter).eval()


def test_gram_projection_equals_explicit_svd():
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out, T = 6, 20, 9, 50
    A, B, X = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((r, d_in), (d_out, r), (T, d_in)))
    G = (X @ A.T).T @ (X @ A.T)
    A_hat, B_hat = project_factors(A, B, G, sparsity=0.5, rule="code")  # q = 3
    for F, score in ((A, X @ A.T), (B, X @ A.T @ B.T)):
        V = torch.linalg.svd(score, full_matrices=False).Vh[:3].T
        want = V @ V.T @ F
        got = A_hat if F is A else B_hat
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rule", ["code", "paper"])
def test_layer_sequential_streaming_equals_release_algorithm(tiny_base, reference, samples, rule):
    cfg = ScoringConfig(sparsity=0.6, rank_rule=rule)  # r = 4: q = 2 either way, but the rule is exercised
    fast = scoring.lowrank_project(_model(tiny_base, reference), samples, cfg, torch.device("cpu"))
    slow = release_lowrank(_model(tiny_base, reference), samples, cfg.sparsity, rule, svd="exact")
    assert set(fast) == set(slow) == set(modeling.adapter_weights(reference))
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], atol=ATOL, rtol=1e-4)
        assert torch.equal(keep_mask(fast[key].abs(), 0.8, "global"), keep_mask(slow[key].abs(), 0.8, "global"))


def test_projection_is_sequential_over_layers(tiny_base, reference, samples):
    """Layer 1 is projected on activations of the already-projected layer 0 (as in ActSVD / the release)."""
    cfg = ScoringConfig(sparsity=0.5)
    seq = scoring.lowrank_project(_model(tiny_base, reference), samples, cfg, torch.device("cpu"))
    model = _model(tiny_base, reference)  # layer 1 alone, on the *unprojected* layer 0
    lora = scoring.modules_by_layer(model)
    cached = scoring.first_layer_inputs(model, samples, "cpu")
    scoring.run_layer(scoring.decoder_layers(model)[0], cached, keep_outputs=True)
    stats = scoring.LayerStats(lora[1]).run(scoring.decoder_layers(model)[1], cached)
    name = next(iter(lora[1]))
    m = lora[1][name]
    A_plain, _ = project_factors(m.lora_A["default"].weight, m.lora_B["default"].weight, stats.gram[name], 0.5, "code")
    assert not torch.allclose(A_plain.float(), seq[f"{name}.lora_A.weight"], atol=1e-4)


def test_calibration_tokens_are_alpaca_prompt_then_truncated_response(tiny_base):
    tok = modeling.load_tokenizer(tiny_base)
    row = {"prompt": "How can I stay safe?", "response": "Lock your doors and stay informed. " * 20}
    (ids, is_response), = scoring.encode_calibration(tok, [row], max_length=16)
    prompt = tok(format_prompt(row["prompt"]))["input_ids"]
    assert ids[0, :len(prompt)].tolist() == prompt
    assert not is_response[0, :len(prompt)].any() and is_response[0, len(prompt):].all()
    assert int(is_response.sum()) == 16
    labels = scoring.labels_of(ids, is_response)
    assert (labels[0, :len(prompt)] == -100).all() and torch.equal(labels[0, len(prompt):], ids[0, len(prompt):])


@pytest.mark.parametrize("granularity", ["global", "row"])
def test_keep_mask_keeps_the_requested_fraction(granularity):
    score = torch.rand(16, 40, generator=torch.Generator().manual_seed(1))
    mask = keep_mask(score, 0.8, granularity)
    if granularity == "global":
        assert int(mask.sum()) == 640 - 512
        assert score[mask].min() > score[~mask].max()
    else:
        assert (mask.sum(1) == 8).all()
        assert all(score[i][mask[i]].min() > score[i][~mask[i]].max() for i in range(16))


def test_score_neurons_writes_masks_keyed_by_adapter_names(tiny_base, reference, tmp_path):
    cfg = ScoringConfig(sparsity=0.8, n_samples=4, max_length=24)
    out = tmp_path / "masks.safetensors"
    report = score_neurons(tiny_base, reference, calibration_rows(6), cfg, out, device="cpu")
    masks = load_masks(out)
    weights = modeling.adapter_weights(reference)
    assert set(masks) == set(weights)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in masks
    for key, m in masks.items():
        assert m.dtype == torch.bool and m.shape == weights[key].shape
        assert int(m.sum()) == m.numel() - int(round(m.numel() * 0.8, 9))
    assert report["n_samples"] == 4 and report["method"] == "lowrank"
    assert scoring.report_path(out).is_file()
    # the mask is the top of |projected reference|, not of the raw reference
    model = _model(tiny_base, reference)
    tok = modeling.load_tokenizer(tiny_base)
    samples = scoring.encode_calibration(tok, scoring.select_calibration(calibration_rows(6), cfg), 24)
    projected = scoring.lowrank_project(model, samples, cfg, torch.device("cpu"))
    assert all(torch.equal(masks[k], keep_mask(projected[k].abs(), 0.8, "global")) for k in masks)


@pytest.mark.parametrize("method", ["wanda", "snip", "random"])
def test_alternative_scores_keep_the_top_fraction_per_row(tiny_base, reference, tmp_path, method):
    cfg = ScoringConfig(method=method, sparsity=0.75, n_samples=3, max_length=16)
    out = tmp_path / f"{method}.safetensors"
    report = score_neurons(tiny_base, reference, calibration_rows(3), cfg, out, device="cpu")
    masks = load_masks(out)
    assert report["granularity"] == "row" and set(masks) == set(modeling.adapter_weights(reference))
    for m in masks.values():
        assert (m.sum(1) == m.shape[1] - int(m.shape[1] * 0.75)).all()


def test_wanda_and_snip_use_the_weights_and_the_data(tiny_base, reference, samples):
    """Wanda on layer 0 = |W|·sqrt(mean x²) by hand; SNIP = |W|·|∂L/∂W| by a plain backward pass."""
    model = _model(tiny_base, reference)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    A = dict(model.named_modules())[name].lora_A["default"].weight.detach().clone()
    xs = []
    hook = dict(model.named_modules())[name].lora_A["default"].register_forward_hook(
        lambda mod, args, out: xs.append(args[0][0]))
    with torch.no_grad():
        for ids, is_response in samples:
            model(input_ids=ids)
            xs[-1] = xs[-1][is_response[0]]
    hook.remove()
    X = torch.cat(xs).double()
    want = A.double().abs() * (X.pow(2).mean(0)).sqrt()[None, :]
    got = scoring.wanda_scores(_model(tiny_base, reference), samples, ScoringConfig(), "cpu")[f"{name}.lora_A.weight"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)

    snip = scoring.snip_scores(_model(tiny_base, reference), samples[:1], "cpu")
    model = _model(tiny_base, reference)
    ids, is_response = samples[0]
    W = dict(model.named_modules())[name].lora_B["default"].weight
    W.requires_grad_(True)
    loss = model(input_ids=ids, labels=scoring.labels_of(ids, is_response)).loss
    (grad,) = torch.autograd.grad(loss, [W])
    torch.testing.assert_close(snip[f"{name}.lora_B.weight"], (W.double().abs() * grad.double().abs()).detach(),
                               rtol=1e-5, atol=1e-10)


def test_calibration_selection_is_seeded_and_capped():
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    a = scoring.select_calibration(rows, ScoringConfig(n_samples=4, seed=1))
    assert a == scoring.select_calibration(rows, ScoringConfig(n_samples=4, seed=1)) and len(a) == 4
    assert scoring.select_calibration(rows, ScoringConfig(n_samples=40)) == rows
    with pytest.raises(ScoringError, match="row 1 needs 'prompt' and 'response'"):
        scoring.select_calibration([rows[0], {"prompt": "x"}], ScoringConfig())


def test_bad_mask_files_fail_clearly(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ScoringError, match="does not exist"):
        load_masks(tmp_path / "nope.safetensors")
    save_file({"x.lora_A.weight": torch.ones(2, 2)}, str(tmp_path / "float.safetensors"))
    with pytest.raises(ScoringError, match="expected bool"):
        load_masks(tmp_path / "float.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ScoringError, match="not a safetensors mask file"):
        load_masks(tmp_path / "junk.safetensors")
