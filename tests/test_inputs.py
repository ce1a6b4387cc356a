"""Bad input is refused with one line and loses nothing (issue 11 rows 6, 7, 8, 10, 12): empty configs, unknown
devices, an empty artifact root, `--out` onto a folder the command did not write, an adapter given with a base
other than the one it was trained on."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from flows.cli import main
from helpers_method import random_adapter

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("text, expected", [("", "is empty; expected a mapping"),
                                            ("# only a comment\n", "is empty; expected a mapping"),
                                            ("- a\n- list\n", "expected a mapping at the top level, got list")])
def test_empty_or_non_mapping_config_is_refused(tmp_path, capsys, text, expected):
    """Row 6: an empty YAML file used to run the whole default cell (~15 min)."""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    (line,) = error_lines(capsys)
    assert str(path) in line and expected in line
    assert not (tmp_path / "runs").exists()


def test_unknown_device_is_refused_before_anything_runs(tmp_path, capsys):
    """Row 7: model.device=tpu9 passed validation and failed 200 lines deep."""
    assert main(["run", str(SMOKE), "--set", f"artifact_root={tmp_path}", "--set", "model.device=tpu9"]) == 2
    err = capsys.readouterr().err
    assert "model.device" in err and "'tpu9'" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_valid_devices_pass():
    from nlsr.config import load_config
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps", "xpu:0"):
        assert load_config(SMOKE, [f"model.device={device}"]).model.device == device


def test_empty_artifact_root_is_refused(tmp_path, capsys, monkeypatch):
    """Row 8: artifact_root="" put the store, mlflow.db and .prefect into the current folder."""
    from nlsr.artifacts import ArtifactError, ArtifactStore
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(SMOKE), "--set", "artifact_root=''"]) == 2
    err = capsys.readouterr().err
    assert "artifact_root is empty" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="artifact root is empty"):
        ArtifactStore("")


# --------------------------------------------------------------------------------------------- --out

@pytest.fixture(scope="module")
def adapters(shared_root, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("outs")
    aligned = random_adapter(tiny_base, root / "aligned", r=2, seed=5, targets=["q_proj", "v_proj"],
                             extra={"base": str(tiny_base)})
    base = ["--base", str(tiny_base), "--artifact-root", str(shared_root)]
    assert main(["reference", *base, "--aligned", str(aligned), "--out", str(root / "ref")]) == 0
    return {"root": root, "base": base, "aligned": aligned, "ref": root / "ref", "tiny": tiny_base}


def _realign(a, out, *extra):
    return main(["realign", *a["base"], "--reference", str(a["ref"]), "--finetuned", str(a["aligned"]),
                 "--method", "safelora", "--out", str(out), *extra])


def test_out_never_replaces_a_foreign_folder(adapters, tmp_path, capsys):
    """Row 10: `nlsr realign --out DIR` deleted DIR and everything in it (`--out runs`: the whole store)."""
    store = tmp_path / "runs"
    (store / "align" / "k").mkdir(parents=True)
    (store / "align" / "k" / "_SUCCESS").write_text("{}")
    (store / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert _realign(adapters, store) == 2
    (line,) = error_lines(capsys)
    assert f"--out {store} is an existing folder that `nlsr realign` did not write" in line and "--force" in line
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "runs"]  # nothing left beside it either

    assert _realign(adapters, tmp_path / "new") == 0
    assert _realign(adapters, tmp_path / "new") == 0  # an earlier output of the same command: replaced
    capsys.readouterr()
    assert main(["reference", *adapters["base"], "--aligned", str(adapters["aligned"]),
                 "--out", str(tmp_path / "new")]) == 2  # written by realign, not by reference
    assert "`nlsr reference` did not write" in capsys.readouterr().err
    assert _realign(adapters, store, "--force") == 0
    assert not (store / "notes.txt").exists() and (store / "adapter_model.safetensors").is_file()


def test_file_outputs_never_replace_a_folder(adapters, tmp_path, capsys):
    folder = tmp_path / "masks.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert main(["score", *adapters["base"], "--reference", str(adapters["ref"]), "--out", str(folder)]) == 2
    assert "is an existing folder; `nlsr score` writes a file" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "x"


# --------------------------------------------------------------------------------------------- recorded base

def test_adapter_with_another_recorded_base_is_refused(adapters, tmp_path, capsys):
    """Row 12: an adapter trained on the raw base, given to `nlsr realign` with W0 as --base (same shapes), was
    accepted silently."""
    from safetensors.torch import load_file, save_file
    w0 = tmp_path / "w0"
    shutil.copytree(adapters["tiny"], w0)  # W0: the raw base with something merged into its q_proj weights
    weights = load_file(str(w0 / "model.safetensors"))
    for k in weights:
        if "q_proj" in k:
            weights[k] = weights[k] + 0.01 * torch.ones_like(weights[k])
    save_file(weights, str(w0 / "model.safetensors"), metadata={"format": "pt"})
    assert main(["realign", "--base", str(w0), "--reference", str(adapters["ref"]), "--finetuned",
                 str(adapters["aligned"]), "--method", "safelora", "--out", str(tmp_path / "out")]) == 2
    (line,) = error_lines(capsys)
    assert f"was trained on the base {adapters['tiny']}, whose weights differ from --base {w0}" in line
    assert not (tmp_path / "out").exists()
    # the same base in another folder is the same base
    copy = tmp_path / "copy"
    shutil.copytree(adapters["tiny"], copy)
    assert main(["realign", "--base", str(copy), "--reference", str(adapters["ref"]), "--finetuned",
                 str(adapters["aligned"]), "--method", "safelora", "--out", str(tmp_path / "out")]) == 0


def test_derived_adapters_inherit_the_base_fingerprint(adapters):
    from nlsr.modeling import adapter_info, base_fingerprint
    info = adapter_info(adapters["ref"])
    assert info["base"] == str(adapters["tiny"]) and info["base_fingerprint"] == base_fingerprint(adapters["tiny"])
    assert os.path.samefile(info["base"], adapters["tiny"])
