"""Integrity: _SUCCESS manifests checked on every hit, damaged artifacts moved aside and recomputed, non-finite
tensors refused when written and loaded, loading errors that name the file (issue 11 rows 1 and 2; the whole
cell is exercised in tests/test_flows.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from nlsr import integrity
from nlsr.artifacts import SUCCESS, ArtifactStore
from nlsr.integrity import IntegrityError
from nlsr.modeling import ModelError


def write(payload: bytes):
    def fn(out: Path) -> dict:
        out.mkdir()
        (out / "weights.bin").write_bytes(payload)
        (out / "sub").mkdir()
        (out / "sub" / "note.json").write_text("{}")
        return {}
    return fn


def events(store, kind):
    return [e for e in store.events() if e["event"] == kind]


def test_success_records_size_and_hash_of_every_file(tmp_path):
    store = ArtifactStore(tmp_path)
    store.run("align", "k", write(b"x" * 100))
    files = store.meta("align", "k")["files"]
    assert set(files) == {"weights.bin", "sub/note.json"}
    assert files["weights.bin"]["size"] == 100
    assert files["weights.bin"]["xxh3"] == integrity.file_hash(tmp_path / "align" / "k" / "weights.bin")


@pytest.mark.parametrize("damage, problem", [
    (lambda f: f.write_bytes(b"x" * 10), "weights.bin has 10 bytes, 100 recorded"),
    (lambda f: f.unlink(), "weights.bin is missing"),
    (lambda f: f.write_bytes(b"y" * 100), "weights.bin content differs from its recorded hash"),
])
def test_damaged_artifact_is_moved_aside_and_recomputed(tmp_path, caplog, damage, problem):
    store = ArtifactStore(tmp_path)
    store.run("align", "k", write(b"x" * 100))
    damage(tmp_path / "align" / "k" / "weights.bin")
    with caplog.at_level(logging.WARNING, logger="nlsr.artifacts"):
        ref = store.run("align", "k", write(b"x" * 100))
    assert ref.file("weights.bin").read_bytes() == b"x" * 100 and not store.damage("align", "k")
    (event,) = events(store, "damaged")
    assert event["problems"] == [problem]
    aside = Path(event["moved_to"])
    assert aside.parent == tmp_path / "align" and aside.name.startswith(".damaged-k-") and (aside / SUCCESS).is_file()
    assert len(events(store, "computed")) == 2
    (line,) = [r.getMessage() for r in caplog.records]
    assert str(tmp_path / "align" / "k") in line and problem in line and str(aside) in line
    assert store.keys("align") == ["k"]  # the damaged copy is not a finished key


def test_large_files_are_hashed_only_on_full_verification(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "HASH_LIMIT", 50)
    store = ArtifactStore(tmp_path)
    store.run("sft", "k", write(b"x" * 100))
    (tmp_path / "sft" / "k" / "weights.bin").write_bytes(b"y" * 100)  # same size: only the hash tells
    assert store.damage("sft", "k") == []
    assert store.damage("sft", "k", full=True) == ["weights.bin content differs from its recorded hash"]
    monkeypatch.setenv(integrity.VERIFY_ENV, "full")  # what `nlsr run --verify` sets
    store.run("sft", "k", write(b"x" * 100))
    assert len(events(store, "damaged")) == 1 and (tmp_path / "sft" / "k" / "weights.bin").read_bytes() == b"x" * 100


def test_garbled_success_marker_is_damage_and_old_markers_still_hit(tmp_path):
    store = ArtifactStore(tmp_path)
    store.run("poison", "a", write(b"1"))
    (tmp_path / "poison" / "a" / SUCCESS).write_text("{not json")
    assert "unreadable" in store.damage("poison", "a")[0]
    store.run("poison", "a", write(b"1"))
    assert len(events(store, "damaged")) == 1
    store.run("poison", "b", write(b"1"))
    marker = tmp_path / "poison" / "b" / SUCCESS
    meta = json.loads(marker.read_text())
    del meta["files"]  # written before manifests existed
    marker.write_text(json.dumps(meta))
    store.run("poison", "b", write(b"2"))
    assert [e["key"] for e in events(store, "hit")] == ["b"]


# --------------------------------------------------------------------------------------------- tensors

@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    from nlsr.config import LoraConfig
    from nlsr.modeling import attach_lora, load_model, save_adapter
    model = attach_lora(load_model(tiny_base, device="cpu"), LoraConfig(r=2, target_modules=["q_proj"]))
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")


def _copy(adapter: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(adapter, dst)
    return dst / "adapter_model.safetensors"


def test_non_finite_adapter_is_refused_on_load_naming_the_file(adapter, tmp_path):
    from nlsr.modeling import adapter_weights
    f = _copy(adapter, tmp_path / "nan")
    good = f.read_bytes()
    header = 8 + int.from_bytes(good[:8], "little")
    f.write_bytes(good[:header] + b"\xff" * (len(good) - header))  # 0xffffffff is a float32 NaN
    with pytest.raises(IntegrityError, match=rf"{f}: tensor .*lora_.* non-finite"):
        adapter_weights(tmp_path / "nan")


def test_unreadable_adapter_error_names_the_file(adapter, tmp_path):
    from nlsr.modeling import adapter_weights
    f = _copy(adapter, tmp_path / "cut")
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelError, match=rf"cannot read {f}: .*damaged file"):
        adapter_weights(tmp_path / "cut")


def test_non_finite_weights_are_never_written(adapter, tmp_path):
    from nlsr.modeling import adapter_weights, save_adapter_weights
    weights = adapter_weights(adapter)
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    with pytest.raises(IntegrityError, match=rf"adapter for {tmp_path / 'out'}: tensor {name}"):
        save_adapter_weights(adapter, weights, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_merged_model_is_refused_on_load(tiny_base, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file

    from nlsr.modeling import load_model
    folder = tmp_path / "w0"
    shutil.copytree(tiny_base, folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if "q_proj" in k)
    weights[name][0, 0] = float("inf")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(IntegrityError, match=rf"{folder}: tensor .*q_proj.* 1 non-finite"):
        load_model(folder, device="cpu")
