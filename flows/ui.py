"""`nlsr ui`: from `make run` to the results in a browser with one command.

Starts the MLflow UI on the local tracking store (`<root>/mlflow.db`, the SQLite file `nlsr run` writes) and the
Prefect UI on the local Prefect home (the database of the temporary API server `nlsr run` used), both on
127.0.0.1, and prints where each shows the results: MLflow's saved results view of every experiment (runs table
with the harmful-score and accuracy columns) and Prefect's flow runs. `--print` prints the commands instead.

Prefect's UI asks its API at the address in PREFECT_UI_API_URL; left unset it assumes port 4200 and shows "Can't
connect to Server API" on any other port, so it is always set (flows/servers.py).
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .servers import Service, free_port, start_mlflow_server, start_prefect_server

MLFLOW_PORT, PREFECT_PORT = 5000, 4200


@dataclass
class UIs:
    """The two running servers and where to point a browser."""
    services: list[Service]
    mlflow: str
    prefect: str
    experiments: dict[str, str] = field(default_factory=dict)  # name -> URL of its results view

    def stop(self) -> None:
        for s in reversed(self.services):
            s.stop()


def prefect_home() -> Path:
    """The Prefect home `nlsr run` uses ($PREFECT_HOME, default ~/.prefect): its database holds the flow runs."""
    from prefect.settings import PREFECT_HOME
    return Path(PREFECT_HOME.value()).expanduser()


def tracking_db(root: str | Path) -> Path:
    return Path(root).expanduser().resolve() / "mlflow.db"


def port_or_free(port: int) -> int:
    """The wanted port when nothing listens on it, else a free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


def experiment_links(root: str | Path, mlflow_url: str) -> dict[str, str]:
    """Every experiment of the local store -> the URL of its results view."""
    from tasks.tracking import client
    from tasks.ui_artifacts import results_view_path
    db = tracking_db(root)
    if not db.is_file():
        return {}
    mlc = client(f"sqlite:///{db}")
    return {e.name: mlflow_url + results_view_path(e.experiment_id) for e in mlc.search_experiments()
            if e.name != "Default"}


def start(root: str | Path = "runs", mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT,
          home: Path | None = None, timeout: float = 300) -> UIs:
    """Both servers on 127.0.0.1 (a busy port is replaced by a free one); stop() ends them."""
    root = Path(root).expanduser().resolve()
    workdir = root / ".servers"
    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:  # both boot at once (each takes 10-60 s on a busy machine)
        futures = [pool.submit(start_mlflow_server, workdir, f"sqlite:///{tracking_db(root)}",
                               port_or_free(mlflow_port), timeout),
                   pool.submit(start_prefect_server, workdir, None, port_or_free(prefect_port), timeout, True,
                               home or prefect_home())]
    started = [f.result() for f in futures if f.exception() is None]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for svc, _ in started:
            svc.stop()
        raise errors[0]
    (mlflow, mlflow_url), (prefect, api) = started
    return UIs([mlflow, prefect], mlflow_url, api.removesuffix("/api"), experiment_links(root, mlflow_url))


def describe(uis: UIs) -> str:
    lines = [f"MLflow UI:  {uis.mlflow}"]
    lines += [f"  {name}: {url}" for name, url in sorted(uis.experiments.items())]
    lines += [f"Prefect UI: {uis.prefect}/runs   (flow runs; each cell's results under its Artifacts tab)",
              f"To send new runs to this Prefect server: export PREFECT_API_URL={uis.prefect}/api",
              "Ctrl-C stops both."]
    return "\n".join(lines)


def commands(root: str | Path = "runs", mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT) -> str:
    """The shell commands that `nlsr ui` runs."""
    db, home = tracking_db(root), prefect_home()
    return (f"# MLflow UI on the local runs\nMLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 "
            f"--port {mlflow_port} --workers 1 --backend-store-uri sqlite:///{db}\n\n"
            f"# Prefect UI on the local Prefect home\nPREFECT_HOME={home} PREFECT_UI_API_URL=http://127.0.0.1:"
            f"{prefect_port}/api prefect server start --host 127.0.0.1 --port {prefect_port}\n")


def serve(root: str | Path = "runs", mlflow_port: int = MLFLOW_PORT, prefect_port: int = PREFECT_PORT) -> int:
    """`nlsr ui`: start both, print where to look, wait for Ctrl-C (or a server dying: exit 1)."""
    if not tracking_db(root).is_file():
        print(f"nlsr ui: no MLflow store at {tracking_db(root)} yet (run `nlsr run` first, or pass --root); "
              f"starting anyway")
    uis = start(root, mlflow_port, prefect_port)
    try:
        print(describe(uis), flush=True)
        while all(s.proc.poll() is None for s in uis.services):
            time.sleep(1)
        dead = [s for s in uis.services if s.proc.poll() is not None]
        print(f"nlsr ui: {dead[0].name} exited; log {dead[0].log}:\n{dead[0].tail()}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        uis.stop()
