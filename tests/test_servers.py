"""The production topology without containers: PostgreSQL + Prefect server + MLflow server + a process worker,
all on 127.0.0.1 with free ports. Deploys the cell flow, runs a one-cell grid of configs/smoke.yaml through the
worker (`nlsr grid --pool`), and reads the metrics back through MLflow's API.

Slow-ish (servers start in ~15-30 s each on a busy 2-core machine): marked `server`; `make test-fast` skips it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from flows.servers import (ServiceError, base_env, pg_bin, start_mlflow_server, start_postgres, start_prefect_server,
                           start_worker)

ROOT = Path(__file__).resolve().parents[1]
POOL = "nlsr-test-pool"

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("servers")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("stack")
    services, pg_dir = [], None
    try:
        db = None
        if pg_bin("initdb"):
            pg, address, pg_dir = start_postgres()
            services.append(pg)
            db = address
        else:
            print("PostgreSQL not installed: the servers use SQLite")
        with ThreadPoolExecutor(2) as pool:  # the two servers boot in parallel
            prefect_f = pool.submit(start_prefect_server, workdir, db and f"postgresql+asyncpg://{db}/prefect")
            mlflow_f = pool.submit(start_mlflow_server, workdir, db and f"postgresql+psycopg2://{db}/mlflow")
            for f in (prefect_f, mlflow_f):
                try:
                    services.append(f.result()[0])
                except ServiceError as err:
                    pytest.fail(str(err))
        api, mlflow_url = prefect_f.result()[1], mlflow_f.result()[1]
        env = base_env(PREFECT_API_URL=api, MLFLOW_TRACKING_URI=mlflow_url, OMP_NUM_THREADS="1",
                       PREFECT_HOME=str(workdir / "client-home"), PREFECT_LOGGING_LEVEL="WARNING")
        yield {"workdir": workdir, "api": api, "mlflow": mlflow_url, "env": env, "services": services,
               "postgres": db}
    finally:
        for svc in reversed(services):
            svc.stop()
        if pg_dir:
            shutil.rmtree(pg_dir, ignore_errors=True)


def nlsr(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cell_runs_through_a_worker_and_lands_in_mlflow(stack):
    from mlflow.tracking import MlflowClient
    env, workdir = stack["env"], stack["workdir"]
    deployed = nlsr(["deploy", "--pool", POOL, "--env", "OMP_NUM_THREADS=1"], env, 180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    worker = start_worker(workdir, stack["api"], POOL, env={"MLFLOW_TRACKING_URI": stack["mlflow"],
                                                            "OMP_NUM_THREADS": "1"})
    stack["services"].append(worker)
    grid = {"name": "served", "base": str(ROOT / "configs" / "smoke.yaml"),
            "overrides": [f"artifact_root={workdir / 'runs'}"], "axes": {"seed": [0]}}
    (workdir / "grid.yaml").write_text(yaml.safe_dump(grid))
    result = nlsr(["grid", str(workdir / "grid.yaml"), "--pool", POOL, "--timeout", "480"], env, 600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\nworker log:\n{worker.tail(60)}"

    client = MlflowClient(stack["mlflow"])
    exp = client.get_experiment_by_name("nlsr/served")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("nlsr.kind") == "grid"]
    cells = [r for r in runs if r.data.tags.get("nlsr.kind") == "cell"]
    assert len(parent) == 1 and len(cells) == 1
    cell = cells[0]
    assert cell.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
    assert cell.info.status == "FINISHED" and parent[0].info.status == "FINISHED"
    assert cell.data.tags.get("prefect.flow_run_id") and cell.data.tags.get("prefect.deployment_id")
    for variant in ("aligned", "finetuned", "realigned", "safelora", "restore-modules"):
        assert f"{variant}/harmful_score" in cell.data.metrics
    artifacts = {a.path for a in client.list_artifacts(cell.info.run_id, "realign/nlsr")}
    assert "realign/nlsr/realign_report.json" in artifacts  # uploaded through the server's artifact proxy
    assert (workdir / "runs" / "grids" / "served" / "pareto.png").is_file()
    if stack["postgres"]:  # the runs really live in PostgreSQL
        psql = [pg_bin("psql") or "psql", "-h", "127.0.0.1", "-p", stack["postgres"].rsplit(":", 1)[1],
                "-U", "postgres", "-tAc"]
        flow_runs = subprocess.run([*psql, "select count(*) from flow_run", "prefect"], capture_output=True,
                                   text=True, check=True).stdout.strip()
        mlflow_runs = subprocess.run([*psql, "select count(*) from runs", "mlflow"], capture_output=True,
                                     text=True, check=True).stdout.strip()
        assert int(flow_runs) >= 2 and int(mlflow_runs) == 2
