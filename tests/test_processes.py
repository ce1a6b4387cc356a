"""`nlsr run` as real processes (issue 11 rows 3, 4, 5, 7): damaged tracking database, two runs into one fresh
root at once, kill -9 of the parent, a stage error. Each run gets its own PREFECT_HOME unless the test shares one
on purpose; the temporary Prefect server is a real uvicorn process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from nlsr.artifacts import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SERVER_APP = "prefect.server.api.server:create_app"

pytestmark = pytest.mark.xdist_group("processes")


def env(prefect_home: Path) -> dict:
    e = {**os.environ, "PREFECT_HOME": str(prefect_home), "OMP_NUM_THREADS": "1"}
    e.pop("PREFECT_API_URL", None)
    return e


def nlsr(*args: str, prefect_home: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env(prefect_home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(err: str) -> list[str]:
    """stderr without Prefect's INFO/progress chatter: what the user must read."""
    return [line for line in err.splitlines() if line.strip() and " | INFO " not in line and "it/s]" not in line
            and "warnings.warn" not in line and "Warning:" not in line]


def test_damaged_tracking_database_is_one_line_naming_it(tmp_path):
    """Row 3: garbage in <root>/mlflow.db gave ~200 lines and four tracebacks naming no file."""
    from tasks.tracking import TrackingError, client
    root = tmp_path / "runs"
    root.mkdir()
    db = root / "mlflow.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingError, match=rf"MLflow database {db} cannot be opened"):
        client(f"sqlite:///{db}")
    code, _, err = finish(nlsr("run", str(SMOKE), "--set", f"artifact_root={root}", prefect_home=tmp_path / "ph"))
    assert code == 1
    lines = error_lines(err)
    assert "Traceback" not in err, err[-3000:]
    assert any(line.startswith("nlsr run: error:") and str(db) in line for line in lines), lines
    assert len(lines) <= 6, lines


def test_stage_error_is_one_line_and_the_traceback_goes_to_the_log(tmp_path):
    """Row 7: a bad model.path inside `nlsr run` printed an 80-100-line Prefect traceback first."""
    root = tmp_path / "runs"
    code, _, err = finish(nlsr("run", str(SMOKE), "--set", f"artifact_root={root}", "--set", "model.source=local",
                               "--set", f"model.path={tmp_path / 'nowhere'}", prefect_home=tmp_path / "ph"))
    assert code == 1 and "Traceback" not in err, err[-3000:]
    (line, hint) = [x for x in error_lines(err) if x.startswith(("nlsr run: error", "(traceback in"))]
    assert "stage base failed" in line and f"model.path {tmp_path / 'nowhere'}" in line
    log = Path(hint.split("traceback in ", 1)[1].split(";", 1)[0])
    assert log.parent == root / "logs" and "Traceback" in log.read_text()


@pytest.mark.server
def test_two_runs_into_a_fresh_root_both_succeed_and_compute_each_stage_once(tmp_path):
    """Row 4: two `nlsr run configs/smoke.yaml` at once into a new root: one failed (MLflow's SQLite migration
    ran twice), 2 of 2 tries. Both share one PREFECT_HOME too (a fresh Prefect database, created once)."""
    root = tmp_path / "runs"
    procs = [nlsr("run", str(SMOKE), "--set", f"artifact_root={root}", prefect_home=tmp_path / "ph")
             for _ in range(2)]
    results = [finish(p) for p in procs]
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "| realigned |" in out
    computed = Counter((e["stage"], e["key"]) for e in ArtifactStore(root).events() if e["event"] == "computed")
    assert len(computed) == 15 and set(computed.values()) == {1}, computed


def _server_children(pid: int) -> list[int]:
    out = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid and SERVER_APP in cmd:
            out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return stat[0] != "Z"
    except OSError:
        return False


@pytest.mark.server
@pytest.mark.parametrize("when", ["starting", "running"])
def test_kill_9_leaves_no_prefect_server_behind(tmp_path, when):
    """Row 5: after kill -9 of `nlsr run`, its temporary Prefect server (uvicorn, ~200 MB, a port) lived forever.
    'starting': killed while the server starts; 'running': once a stage has run."""
    root = tmp_path / "runs"
    proc = nlsr("run", str(SMOKE), "--set", f"artifact_root={root}", prefect_home=tmp_path / "ph")
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            servers = servers or _server_children(proc.pid)
            if servers and (when == "starting" or (root / "_events.jsonl").is_file()):
                break
            time.sleep(0.2)
        assert servers and proc.poll() is None, "the run never started its Prefect server"
        proc.send_signal(signal.SIGKILL)  # at once: the server's environment marks it, nothing has to be seen first
        proc.wait()  # not communicate(): an orphaned server would hold the pipes open
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in servers):
            time.sleep(0.5)
        assert not any(_alive(p) for p in servers), f"orphaned Prefect server(s) {servers}"
    finally:
        for p in servers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
