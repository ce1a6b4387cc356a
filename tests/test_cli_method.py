"""`nlsr reference | score | realign` end to end on the tiny model, and their user errors (exit code 2)."""
import json
import subprocess
import sys

import pytest

from flows.cli import main
from helpers_method import perturbed_adapter, random_adapter
from nlsr import modeling
from nlsr.config import LoraConfig, ModelConfig, TinyModel
from nlsr.data import calibration_set, write_jsonl


@pytest.fixture(scope="module")
def pipeline(shared_root, tiny_base, tmp_path_factory):
    """aligned adapter, calibration file, and the outputs of the three commands (run once for the module)."""
    root = tmp_path_factory.mktemp("cli")
    aligned = random_adapter(tiny_base, root / "aligned", r=4, seed=21)
    finetuned = perturbed_adapter(aligned, root / "finetuned", seed=22, noise=0.08)
    calib = write_jsonl(calibration_set(6, seed=0), root / "calib.jsonl")
    base = ["--base", "tiny", "--artifact-root", str(shared_root)]
    assert main(["reference", *base, "--aligned", str(aligned), "--beta", "0.9", "--out", str(root / "ref")]) == 0
    assert main(["score", *base, "--reference", str(root / "ref"), "--calibration", str(calib), "--method",
                 "lowrank", "--sparsity", "0.8", "--n-samples", "4", "--max-length", "24", "--device", "cpu",
                 "--out", str(root / "masks.safetensors")]) == 0
    return {"root": root, "base": base, "base_folder": tiny_base, "aligned": aligned, "finetuned": finetuned,
            "calib": calib, "ref": root / "ref", "masks": root / "masks.safetensors"}


def _realign(p, out, *extra):
    return main(["realign", *p["base"], "--reference", str(p["ref"]), "--finetuned", str(p["finetuned"]),
                 "--masks", str(p["masks"]), "--out", str(out), *extra])


def test_reference_and_score_outputs(pipeline, capsys):
    ref = json.loads((pipeline["ref"] / "reference_report.json").read_text())
    assert ref["mode"] == "paper" and ref["delta_w_scale"] == pytest.approx(1.9)
    score = json.loads(pipeline["masks"].with_suffix(".report.json").read_text())
    assert score["method"] == "lowrank" and score["n_samples"] == 4 and score["n_masks"] == 28
    assert set(modeling.adapter_weights(pipeline["ref"])) == set(score["kept_per_factor"])


def test_score_on_reference_answers(pipeline, tmp_path, capsys):
    out = tmp_path / "masks.safetensors"
    assert main(["score", *pipeline["base"], "--reference", str(pipeline["ref"]), "--calibration", "reference",
                 "--judge", "classifier", "--n-samples", "3", "--calibration-pool", "6", "--max-length", "24",
                 "--device", "cpu", "--out", str(out)]) == 0
    answers = [json.loads(line) for line in (tmp_path / "calibration.jsonl").read_text().splitlines()]
    rep = json.loads(out.with_suffix(".report.json").read_text())
    safe = sum(1 for a in answers if a["response"] and not a["harmful"])
    assert len(answers) == 6 and rep["calibration"] == "reference" and rep["calibration_safe"] == safe
    assert rep["n_samples"] == min(3, safe) and rep["n_masks"] == 28
    assert f"answered 6 prompts, the classifier judge kept {safe}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["nlsr", "restore-modules", "safelora"])
def test_realign_end_to_end(pipeline, tmp_path, capsys, method):
    out = tmp_path / method
    assert _realign(pipeline, out, "--method", method, "--seed", "3", "--tau", "0.99") == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "realign_report.json").read_text())
    assert f"patched {rep['n_patched']}/14 modules" in printed and rep["method"] == method
    tok = modeling.load_tokenizer(pipeline["base_folder"])
    model = modeling.load_adapter(modeling.load_model(pipeline["base_folder"], device="cpu"), out)
    assert model(**tok(["hi"], return_tensors="pt")).logits.isfinite().all()


def test_realign_direction_and_rates_reach_the_report(pipeline, tmp_path):
    out = tmp_path / "code"
    assert _realign(pipeline, out, "--direction", "code", "--layer-rate", "0.6", "--epsilon", "0.3") == 0
    rep = json.loads((out / "realign_report.json").read_text())
    probs = sorted((m["similarity"], m["p_patch"]) for m in rep["modules"])
    assert probs[0][1] == pytest.approx(0.3) and probs[-1][1] == pytest.approx(0.9)  # code: similar → patched


def _fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_mismatched_adapters_fail_clearly(pipeline, tmp_path, tiny_base, capsys):
    rank8 = random_adapter(tiny_base, tmp_path / "rank8", r=8)
    _fails(["realign", *pipeline["base"], "--reference", str(pipeline["ref"]), "--finetuned", str(rank8),
            "--masks", str(pipeline["masks"]), "--out", str(tmp_path / "o")], capsys,
           str(pipeline["ref"]), str(rank8), "differ in r: 4 vs 8")
    attn = random_adapter(tiny_base, tmp_path / "attn", r=4, targets=["q_proj", "v_proj"])
    _fails(["realign", "--reference", str(pipeline["ref"]), "--finetuned", str(attn), "--masks",
            str(pipeline["masks"]), "--out", str(tmp_path / "o")], capsys, "differ in target_modules")
    other_base = modeling.base_folder(ModelConfig(source="tiny", tiny=TinyModel(hidden_size=32)), tmp_path)
    other = modeling.save_adapter(modeling.attach_lora(modeling.load_model(other_base, device="cpu"),
                                                       LoraConfig(r=4, alpha=8)), tmp_path / "other")
    _fails(["realign", *pipeline["base"], "--reference", str(pipeline["ref"]), "--finetuned", str(other),
            "--masks", str(pipeline["masks"]), "--out", str(tmp_path / "o")], capsys, "another base")
    _fails(["reference", *pipeline["base"], "--aligned", str(other), "--out", str(tmp_path / "o")], capsys,
           "another base")
    assert not (tmp_path / "o").exists()


def test_missing_files_fail_clearly(pipeline, tmp_path, capsys):
    _fails(["reference", "--aligned", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys,
           "aligned adapter", "does not exist")
    _fails(["score", *pipeline["base"], "--reference", str(pipeline["ref"]), "--calibration",
            str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "m.safetensors")], capsys, "none.jsonl",
           "does not exist")
    _fails(["realign", "--reference", str(pipeline["ref"]), "--finetuned", str(pipeline["finetuned"]),
            "--masks", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")], capsys,
           "mask file", "does not exist")
    _fails(["realign", "--base", str(tmp_path / "nobase"), "--reference", str(pipeline["ref"]), "--finetuned",
            str(pipeline["finetuned"]), "--masks", str(pipeline["masks"]), "--out", str(tmp_path / "o")], capsys,
           "nobase")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    _fails(["score", *pipeline["base"], "--reference", str(pipeline["ref"]), "--calibration", str(bad), "--out",
            str(tmp_path / "m.safetensors")], capsys, "missing field(s) ['response']")


def test_out_of_range_rates_fail_clearly(pipeline, tmp_path, capsys):
    _fails(["realign", "--reference", str(pipeline["ref"]), "--finetuned", str(pipeline["finetuned"]), "--masks",
            str(pipeline["masks"]), "--layer-rate", "0.9", "--out", str(tmp_path / "o")], capsys,
           "layer_rate ± realign.epsilon must stay in [0, 1]")
    _fails(["realign", "--reference", str(pipeline["ref"]), "--finetuned", str(pipeline["finetuned"]), "--masks",
            str(pipeline["masks"]), "--tau", "1.5", "--out", str(tmp_path / "o")], capsys, "safelora_tau")
    _fails(["score", *pipeline["base"], "--reference", str(pipeline["ref"]), "--sparsity", "1.2", "--out",
            str(tmp_path / "m.safetensors")], capsys, "sparsity")
    _fails(["reference", "--aligned", str(pipeline["aligned"]), "--beta", "-1", "--out", str(tmp_path / "o")],
           capsys, "beta")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.safetensors").exists()


def test_help_lists_the_method_commands():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(cmd in out for cmd in ("reference", "score", "realign"))
