"""Flow runs whose process died: marked Crashed when the next run starts.

A cell killed from outside (OOM killer, Ctrl-C twice, a closed laptop) never reports its end, so Prefect shows it
"Running" forever; self-hosted servers have no zombie detection unless someone sets up an automation. Each flow
run here records where it runs as its `infrastructure_pid`, "<host>:<pid>" (the format Prefect's process worker
uses), and every new run first looks for Running runs recorded on this host whose process is gone, and marks them
Crashed. Runs of other hosts are left alone: their pids mean nothing here.
"""
from __future__ import annotations

import os
import socket

from prefect import get_run_logger

def here() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie child counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def dead_here(infrastructure_pid: str | None) -> bool:
    """The recorded "<host>:<pid>" is on this host and its process is gone."""
    host, _, pid = (infrastructure_pid or "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))


def record(client, flow_run_id) -> None:
    """Write this process's "<host>:<pid>" on the flow run (a worker already wrote its own: keep it)."""
    run = client.read_flow_run(flow_run_id)
    if not run.infrastructure_pid:
        client.update_flow_run(flow_run_id, infrastructure_pid=here())


def reap(client, skip=()) -> list[str]:
    """Mark Crashed every Running flow run whose recorded process on this host is gone; returns their names."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed
    running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    crashed, skip = [], {str(s) for s in skip}
    for run in running:
        if str(run.id) in skip or not dead_here(run.infrastructure_pid):
            continue
        client.set_flow_run_state(run.id, Crashed(message=f"process {run.infrastructure_pid} is gone (found by the "
                                                          f"next run, {here()})"), force=True)
        crashed.append(run.name)
    return crashed


def claim_and_reap(flow_run_id) -> None:
    """At the start of a flow run: record where it runs, then mark dead runs Crashed. Never fails the run."""
    from prefect.client.orchestration import get_client
    try:
        with get_client(sync_client=True) as client:
            record(client, flow_run_id)
            crashed = reap(client, skip={flow_run_id})
    except Exception as err:  # noqa: BLE001 - bookkeeping only
        get_run_logger().warning(f"could not check for crashed runs: {err}")
        return
    if crashed:
        get_run_logger().warning(f"marked {len(crashed)} flow run(s) whose process died as Crashed: "
                                 f"{', '.join(crashed)}")
