"""The content-addressed artifact store: idempotent runs, partial outputs, cross-process locking (no Prefect)."""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from nlsr.artifacts import SUCCESS, ArtifactError, ArtifactStore, stage_key


def write_file(text: str):
    def fn(out: Path) -> dict:
        out.mkdir()
        (out / "data.txt").write_text(text)
        return {"chars": len(text), "losses": [(1, 2.0), (2, 1.5)]}
    return fn


def computed(store: ArtifactStore, stage: str | None = None) -> list[dict]:
    return [e for e in store.events() if e["event"] == "computed" and (stage is None or e["stage"] == stage)]


def test_stage_key_depends_on_config_version_and_inputs():
    k = stage_key("sft", 1, {"lr": 1e-3}, {"base": "abc"})
    assert k == stage_key("sft", 1, {"lr": 1e-3}, {"base": "abc"})
    assert len({k, stage_key("sft", 2, {"lr": 1e-3}, {"base": "abc"}), stage_key("sft", 1, {"lr": 2e-3},
               {"base": "abc"}), stage_key("sft", 1, {"lr": 1e-3}, {"base": "abd"}),
                stage_key("align", 1, {"lr": 1e-3}, {"base": "abc"})}) == 5


def test_run_computes_once_and_records_success(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = store.run("poison", "k1", write_file("hello"), meta={"config": {"p": 0.1}})
    assert ref.stage == "poison" and ref.key == "k1" and Path(ref.path) == tmp_path / "poison" / "k1"
    assert ref.file("data.txt").read_text() == "hello"
    meta = json.loads((tmp_path / "poison" / "k1" / SUCCESS).read_text())
    assert meta["config"] == {"p": 0.1} and meta["metrics"]["chars"] == 5
    assert meta["metrics"]["losses"] == [[1, 2.0], [2, 1.5]]
    assert "wall_s" in meta["timings"] and "torch" in meta["versions"]
    mtime = (tmp_path / "poison" / "k1" / SUCCESS).stat().st_mtime_ns

    def boom(out):
        raise AssertionError("a finished key must not be recomputed")
    again = store.run("poison", "k1", boom)
    assert again == ref
    assert (tmp_path / "poison" / "k1" / SUCCESS).stat().st_mtime_ns == mtime
    assert [e["event"] for e in store.events()] == ["start", "computed", "hit"]
    assert store.keys("poison") == ["k1"] and store.done("poison", "k1")


def test_single_file_output(tmp_path):
    store = ArtifactStore(tmp_path)

    def fn(out: Path):
        assert out.name == "masks.bin" and out.parent.is_dir() and not out.exists()
        out.write_bytes(b"\x00\x01")
        return None
    ref = store.run("score", "k", fn, output="masks.bin")
    assert ref.file("masks.bin").read_bytes() == b"\x00\x01" and ref.metrics == {}


def test_failure_leaves_nothing_and_partials_are_ignored_and_cleaned(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(out: Path):
        out.mkdir()
        (out / "half.bin").write_text("half")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        store.run("sft", "k", crash)
    assert not store.done("sft", "k") and list((tmp_path / "sft").iterdir()) == []

    # leftovers of a killed process: a temporary folder and a renamed folder whose _SUCCESS never came
    (tmp_path / "sft" / ".tmp-k-123-abc").mkdir(parents=True)
    (tmp_path / "sft" / "k").mkdir()
    (tmp_path / "sft" / "k" / "weights.bin").write_text("partial")
    assert not store.done("sft", "k") and store.keys("sft") == []
    with pytest.raises(ArtifactError):
        store.meta("sft", "k")
    ref = store.run("sft", "k", write_file("fresh"))
    assert sorted(p.name for p in Path(ref.path).iterdir()) == [SUCCESS, "data.txt"]
    assert not (tmp_path / "sft" / ".tmp-k-123-abc").exists()


def test_empty_output_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="wrote nothing"):
        ArtifactStore(tmp_path).run("x", "k", lambda out: out.mkdir())


def test_clean_leaves_other_stages_and_finished_keys(tmp_path):
    store = ArtifactStore(tmp_path)
    store.run("a", "done", write_file("x"))
    (tmp_path / "a" / "partial").mkdir()
    (tmp_path / "models" / "tiny").mkdir(parents=True)  # not a stage: never touched
    removed = store.clean("a")
    assert [p.name for p in removed] == ["partial"]
    assert store.done("a", "done") and (tmp_path / "models" / "tiny").is_dir()


def _slow_stage(root: str, tag: str, results) -> None:
    store = ArtifactStore(root)

    def fn(out: Path):
        time.sleep(1.0)  # long enough for the other process to ask for the same key meanwhile
        out.mkdir()
        (out / "who.txt").write_text(tag)
        return {"who": tag}
    results.put(store.run("align", "shared", fn).metrics["who"])


def test_two_processes_never_compute_the_same_key_twice(tmp_path):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_slow_stage, args=(str(tmp_path), tag, results)) for tag in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = {results.get(timeout=5), results.get(timeout=5)}
    store = ArtifactStore(tmp_path)
    assert len(winners) == 1  # both got the one artifact
    assert len(computed(store, "align")) == 1
    assert sorted(e["event"] for e in store.events()) == ["computed", "hit", "start"]


def test_paths_reported_inside_the_temporary_folder_point_to_the_final_one(tmp_path):
    store = ArtifactStore(tmp_path)

    def stage(out: Path) -> dict:
        out.mkdir()
        (out / "samples.jsonl").write_text("{}\n")
        (out / "realign_report.json").write_text(json.dumps({"out": str(out), "base": "/x/y"}))
        return {"samples": str(out / "samples.jsonl"), "files": [str(out / "samples.jsonl")], "other": "/x/y"}

    ref = store.run("evaluate", "k1", stage)
    final = store.path("evaluate", "k1")
    assert ref.metrics["samples"] == str(final / "samples.jsonl") and Path(ref.metrics["samples"]).is_file()
    assert ref.metrics["files"] == [str(final / "samples.jsonl")] and ref.metrics["other"] == "/x/y"
    assert json.loads((final / SUCCESS).read_text())["metrics"]["samples"] == str(final / "samples.jsonl")
    # the stage's own report too (it wrote the temporary path), and the manifest holds the rewritten file
    assert json.loads((final / "realign_report.json").read_text()) == {"out": str(final), "base": "/x/y"}
    assert store.damage("evaluate", "k1", full=True) == []
