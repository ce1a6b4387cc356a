"""Child servers die with the process that started them, even when it is killed with `kill -9`.

Prefect's temporary API server (uvicorn, ~200 MB and a port) is a child of `nlsr run`; Prefect stops it from an
atexit hook, which a SIGKILL never runs. `watch(pid)` starts a tiny watchdog process that polls its parent and,
once the parent is gone (the watchdog is re-parented), terminates the server (its process group for servers
started in a session of their own). Polling rather than PR_SET_PDEATHSIG: the server is started by Prefect's
code, not ours, and the watchdog works on any POSIX system.
"""
from __future__ import annotations

import os
import subprocess
import sys

POLL_S = 0.5

_WATCHDOG = r"""
import os, signal, sys, time
parent, pid, group, poll = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
def alive():
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while os.getppid() == parent:
    if not alive():
        sys.exit(0)
    time.sleep(poll)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        sys.exit(0)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and alive():
        time.sleep(0.1)
"""


def watch(pid: int, group: bool = False, poll_s: float = POLL_S) -> subprocess.Popen:
    """Kill `pid` (or its process group) when this process dies; returns the watchdog (it exits on its own when
    `pid` ends first)."""
    return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(pid),
                             "1" if group else "0", str(poll_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
