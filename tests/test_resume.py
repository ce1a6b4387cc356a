"""Resume: a cell that fails in a stage is resumed by running it again; finished stages are not recomputed
(checked in the artifact store: _SUCCESS mtimes and the computed-events log), and the results equal an
uninterrupted run's. The failure comes from the testing hook NLSR_FAIL_STAGE (tasks/policy.py)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nlsr.artifacts import SUCCESS, ArtifactStore
from nlsr.config import load_config

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("prefect")


def smoke(root: Path):
    return load_config(ROOT / "configs" / "smoke.yaml", [f"artifact_root={root}"])


def finished(store: ArtifactStore) -> dict[tuple[str, str], int]:
    """(stage, key) -> mtime of its _SUCCESS, for every finished artifact."""
    out = {}
    for stage_dir in store.root.iterdir():
        for key_dir in stage_dir.glob("*/"):
            if (key_dir / SUCCESS).is_file():
                out[(stage_dir.name, key_dir.name)] = (key_dir / SUCCESS).stat().st_mtime_ns
    return out


def test_failed_cell_resumes_without_recomputing(tmp_path, monkeypatch):
    from flows.cell import cell
    from tasks.keys import plan
    from tasks.tracking import client, experiment_name, tracking_uri
    cfg = smoke(tmp_path / "resumed")
    store, nodes = ArtifactStore(cfg.artifact_root), plan(cfg)

    monkeypatch.setenv("NLSR_FAIL_STAGE", "finetune")
    failed = cell(cfg, return_state=True)
    assert failed.is_failed() and "NLSR_FAIL_STAGE" in str(failed.message)
    before = finished(store)
    assert {s for s, _ in before} == {"poison", "sft", "align", "reference", "score"}
    assert not any((store.root / "finetune").iterdir())  # the crash left no partial folder behind

    monkeypatch.delenv("NLSR_FAIL_STAGE")
    rows = cell(cfg)
    after = finished(store)
    assert all(after[k] == mtime for k, mtime in before.items())  # finished stages untouched
    assert set(after) == {(n.stage, n.key) for n in nodes.values()}
    computed = Counter((e["stage"], e["key"]) for e in store.events() if e["event"] == "computed")
    assert set(computed.values()) == {1}  # no stage computed twice
    assert [e["stage"] for e in store.events() if e["event"] == "failed"] == ["finetune"]

    # One MLflow run: the failed run was reattached and finished.
    mlc = client(tracking_uri(cfg))
    exp = mlc.get_experiment_by_name(experiment_name(cfg))
    runs = mlc.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    # Same results (and the same artifact keys) as an uninterrupted run in a fresh store.
    fresh = smoke(tmp_path / "uninterrupted")
    expected = cell(fresh)
    assert rows == expected
    assert set(finished(ArtifactStore(fresh.artifact_root))) == set(after)
