"""Start the production topology without containers, on 127.0.0.1: PostgreSQL, the Prefect server, the MLflow
server and a Prefect process worker. Used by the server tests, `scripts/local-stack.sh` and `nlsr ui` (flows/ui.py).

Every service gets a free port, a log file, a health check with a deadline (failing fast with the log's tail), and
a stop() that always terminates it. Docker compose (docker-compose.yml) runs the same services in containers.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nlsr.env import OFFLINE_DEFAULTS

from .lifeline import watch

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/local/pgsql/bin")


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script of this Python environment (prefect, mlflow), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_DEFAULTS, "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Service:
    """A child process with a log file; stop() terminates it (SIGINT first for Prefect workers)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None, cwd: str | None = None,
                 stop_signal: int = signal.SIGTERM, user: str | None = None):
        self.name, self.log, self.stop_signal = name, log, stop_signal
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)
        watch(self.proc.pid, group=True)  # the service dies with us, even after kill -9 (flows/lifeline.py)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float, expect: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.proc.returncode}; log {self.log}:\n"
                                   f"{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 200 and (expect is None or expect in body):
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServiceError(f"{self.name} not healthy at {url} after {timeout:.0f} s; log {self.log}:\n{self.tail()}")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, self.stop_signal)  # the whole session: uvicorn / gunicorn children too
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        self._fh.close()


# --------------------------------------------------------------------------------------------- postgres

def pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (Path(d) / name).exists():
            return str(Path(d) / name)
    return shutil.which(name)


def start_postgres(databases: tuple[str, ...] = ("prefect", "mlflow"), timeout: float = 60) -> tuple[Service, str, Path]:
    """A throw-away PostgreSQL cluster on a free port; returns (service, 'user@127.0.0.1:port', data dir).

    As root, the cluster runs as the 'postgres' user (initdb refuses root), in a folder of its own under /tmp.
    """
    initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
    if not (initdb and postgres):
        raise ServiceError(f"PostgreSQL binaries not found (looked in {', '.join(PG_BIN_DIRS)} and PATH)")
    user = "postgres" if os.geteuid() == 0 else None
    workdir = Path(tempfile.mkdtemp(prefix="nlsr-pg-"))
    data = workdir / "data"
    if user:
        shutil.chown(workdir, user)
    run = (lambda cmd: subprocess.run(["runuser", "-u", user, "--", *cmd], check=True, capture_output=True)) \
        if user else (lambda cmd: subprocess.run(cmd, check=True, capture_output=True))
    try:
        run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
    except subprocess.CalledProcessError as err:
        raise ServiceError(f"initdb failed: {err.stderr.decode(errors='replace')}") from None
    port = free_port()
    log = workdir / "postgres.log"
    if user:
        log.touch()
        shutil.chown(log, user)
    svc = Service("postgres", [postgres, "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(workdir),
                               "-c", "fsync=off", "-c", "max_connections=200"], log, user=user)
    deadline = time.monotonic() + timeout
    while True:
        if svc.proc.poll() is not None:
            raise ServiceError(f"postgres exited ({svc.proc.returncode}):\n{svc.tail()}")
        ok = subprocess.run([pg_bin("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                            capture_output=True).returncode == 0
        if ok:
            break
        if time.monotonic() > deadline:
            svc.stop()
            raise ServiceError(f"postgres not ready after {timeout} s:\n{svc.tail()}")
        time.sleep(0.3)
    psql = pg_bin("psql") or "psql"
    for db in databases:
        subprocess.run([psql, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                       check=True, capture_output=True)
    return svc, f"postgres@127.0.0.1:{port}", workdir


# --------------------------------------------------------------------------------------------- prefect, mlflow

def start_prefect_server(workdir: Path, db_url: str | None = None, port: int | None = None,
                         timeout: float = 120, ui: bool = False, home: Path | None = None) -> tuple[Service, str]:
    """`prefect server start` on 127.0.0.1; db_url: postgresql+asyncpg://... (None: SQLite in `home`, default
    workdir/prefect-home). The UI is told the API's real address: it assumes port 4200 otherwise."""
    port = port or free_port()
    env = base_env(PREFECT_HOME=str(home or workdir / "prefect-home"), PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_ENABLED=str(ui).lower(),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    env.pop("PREFECT_API_URL", None)
    if db_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = db_url
    svc = Service("prefect-server", [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                     str(port)], workdir / "prefect-server.log", env=env)
    api = f"http://127.0.0.1:{port}/api"
    svc.wait_http(f"{api}/health", timeout)
    return svc, api


def start_mlflow_server(workdir: Path, backend_uri: str | None = None, port: int | None = None,
                        timeout: float = 120) -> tuple[Service, str]:
    """`mlflow server` with one worker and job execution off (2 processes instead of ~13), proxied artifacts."""
    port = port or free_port()
    backend_uri = backend_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    artifacts = workdir / "mlflow-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    svc = Service("mlflow-server", [bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                    "--workers", "1", "--backend-store-uri", backend_uri,
                                    "--artifacts-destination", artifacts.as_uri()],
                  workdir / "mlflow-server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    svc.wait_http(f"{url}/health", timeout)
    return svc, url


def start_worker(workdir: Path, api_url: str, pool: str, env: dict | None = None, limit: int = 1) -> Service:
    """A process worker on `pool` (created if missing). Prefect workers ignore SIGTERM: stop with SIGINT."""
    wenv = base_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(workdir / "worker-home"), **(env or {}))
    return Service(f"worker-{pool}", [bin_path("prefect"), "worker", "start", "--pool", pool, "--type", "process",
                                      "--limit", str(limit), "--name", f"{pool}-worker"],
                   workdir / f"worker-{pool}.log", env=wenv, stop_signal=signal.SIGINT)
