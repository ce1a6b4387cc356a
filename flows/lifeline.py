"""Child servers die with the process that started them, even when it is killed with `kill -9`.

Prefect's temporary API server (uvicorn, ~200 MB and a port) is a child of `nlsr run`; Prefect stops it from an
atexit hook, which a SIGKILL never runs. `watch()` starts a tiny watchdog process that polls its parent and,
once the parent is gone (the watchdog is re-parented), terminates the server: a given pid (its process group for
servers started in a session of their own), or every child of the parent whose command line contains `match`,
as seen while the parent lived (Linux /proc), which also covers a kill during the server's start-up. Polling
rather than PR_SET_PDEATHSIG: the server is started by Prefect's code, not ours.
"""
from __future__ import annotations

import os
import subprocess
import sys

POLL_S = 0.5

_WATCHDOG = r"""
import os, signal, sys, time
parent, pid, group, match, poll = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], float(sys.argv[5])

def alive(p):
    try:
        os.kill(p, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

def cmdline(p):
    try:
        with open(f"/proc/{p}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

def children():
    out = set()
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:  # state, ppid, ...
            out.add(int(name))
    return out

known, last_scan = set(), 0.0
while os.getppid() == parent:
    # scanning /proc costs a few ms: every poll until the server is seen, then every 10 s (a restarted server)
    if match and (not known or time.monotonic() - last_scan > 10):
        known |= {c for c in children() if match in cmdline(c)}
        last_scan = time.monotonic()
    elif not match and not alive(pid):
        sys.exit(0)
    time.sleep(poll)
targets = [p for p in known if alive(p) and match in cmdline(p)] if match else [pid]
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    for p in targets:
        try:
            os.killpg(p, sig) if group else os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.1)
"""


def watch(pid: int | None = None, group: bool = False, match: str | None = None,
          poll_s: float = POLL_S) -> subprocess.Popen:
    """When this process dies, kill `pid` (or its process group), or this process's children whose command
    line contains `match`. The watchdog exits with this process (or when `pid` ends first)."""
    if (pid is None) == (match is None):
        raise ValueError("watch() needs exactly one of pid and match")
    return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(pid or 0),
                             "1" if group else "0", match or "", str(poll_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
