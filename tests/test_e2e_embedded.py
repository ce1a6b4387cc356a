"""One short end-to-end run of the whole cell on the real SmolLM2-135M-Instruct (micro sizes, a few minutes on CPU).

The tiny random model proves the plumbing; this proves the real model goes through every stage: the embedded GGUF
conversion, trl training of each stage, low-rank scoring, realignment and generation-based evaluation.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlsr.config import load_config

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "data.n=24", "data.poison_ratio=0.25",
    "alignment.sft.max_steps=2", "alignment.sft.batch_size=4", "alignment.sft.n_samples=8",
    "alignment.preference.max_steps=1", "alignment.preference.batch_size=2", "alignment.preference.grad_accum=1",
    "alignment.preference.n_samples=2",
    "finetune.max_steps=2", "finetune.batch_size=4", "finetune.epochs=1",
    "scoring.n_samples=4", "scoring.max_length=64",
    "evaluation.harmful_limit=4", "evaluation.task_limit=4", "evaluation.max_new_tokens=8",
    "evaluation.task_max_new_tokens=3",
]


@pytest.mark.slow
def test_default_cell_runs_on_the_embedded_model(tmp_path, embedded_base):
    root = tmp_path / "runs"
    (root / "models").mkdir(parents=True)
    (root / "models" / embedded_base.name).symlink_to(embedded_base)  # reuse the cached conversion
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / "default.yaml"),
           *[f"--set={o}" for o in MICRO], f"--set=artifact_root={root}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "| realigned |" in res.stdout and "| finetuned |" in res.stdout

    rows = json.loads(next((root / "report").glob("*/rows.json")).read_text())
    by_variant = {r["variant"]: r for r in rows}
    baselines = load_config(ROOT / "configs" / "default.yaml").realign.baselines
    assert set(by_variant) == {"aligned", "finetuned", "realigned", *baselines} and baselines
    for r in rows:
        assert 0.0 <= r["harmful_score"] <= 100.0 and 0.0 <= r["task_accuracy"] <= 100.0

    reports = [json.loads(p.read_text()) for p in (root / "realign").rglob("realign_report.json")]
    nlsr = next(r for r in reports if r["method"] == "nlsr")
    assert nlsr["n_modules"] == 30 * 7 and 0 < nlsr["n_patched"] < nlsr["n_modules"]

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("nlsr/default")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert any(k.endswith("harmful_score") for k in run.data.metrics)
