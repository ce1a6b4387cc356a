"""Register the cell flow with a Prefect server for a work pool (`nlsr deploy`).

Workers load the flow from `source` (default: this checkout; in the compose stack the image's /app). One process
worker per GPU, `--limit 1`, all on one pool: parallelism is one cell per GPU. The grid flow is not deployed on
the same pool: it waits for its cells, and a waiting grid must not hold the slot of a GPU worker. Run it from the
CLI (`nlsr grid GRID.yaml --pool POOL`) or deploy it to a separate CPU pool.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CELL_ENTRYPOINT = "flows/cell.py:cell"


def ensure_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def deploy_cell(pool: str, name: str = "nlsr-cell", source: str | None = None, env: dict | None = None,
                create_pool: bool = True) -> str:
    """Deploy `nlsr-cell/<name>` on `pool`; returns the deployment id."""
    from prefect import flow
    if create_pool:
        ensure_pool(pool)
    remote = flow.from_source(source=str(source or REPO), entrypoint=CELL_ENTRYPOINT)
    deployment_id = remote.deploy(name=name, work_pool_name=pool, build=False, push=False,
                                  job_variables={"env": env} if env else None, tags=["nlsr"],
                                  description="one NLSR experiment cell (all stages, cached)",
                                  print_next_steps=False, ignore_warnings=True)
    return str(deployment_id)
