"""Child servers die with the process that started them, even when it is killed with `kill -9`.

Prefect's temporary API server (uvicorn, ~200 MB and a port) is a child of `nlsr run`; Prefect stops it from an
atexit hook, which a SIGKILL never runs. `watch()` starts a tiny watchdog process that polls its parent and,
once the parent is gone (the watchdog is re-parented), terminates the server: a given pid (its process group for
servers started in a session of their own), or every process whose command line contains `match` and whose
environment carries this parent's lifeline token (Linux /proc). The token is put into `os.environ` before the
server is spawned, so every process the parent starts afterwards inherits it: nothing has to be seen while the
parent lives, which closes the race of a kill during the server's start-up or before the watchdog's first scan
(the cause of the orphans in 2 of 4 CI runs of the first, children-scanning version). Polling rather than
PR_SET_PDEATHSIG: the server is started by Prefect's code, not ours.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

POLL_S = 0.5
TOKEN_VAR = "NLSR_LIFELINE"  # the environment variable that marks the processes a parent started after watch()

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

def marked():
    # processes (not this one) started by the parent after watch(): their environment holds the token
    out = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if token in env and match in cmdline(int(name)):
            out.append(int(name))
    return out

token = sys.argv[6].encode()  # NAME=value, as /proc/<pid>/environ holds it
while os.getppid() == parent:
    if not match and not alive(pid):
        sys.exit(0)
    time.sleep(poll)
targets = [pid]
if match:  # a few scans: a server forked but not yet exec'd shows its environment (and command line) only after exec
    targets = set()
    for _ in range(4):
        targets |= set(marked())
        time.sleep(poll)
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
    """When this process dies, kill `pid` (or its process group), or the processes this process starts after
    this call whose command line contains `match`. The watchdog exits with this process (or when `pid` ends first)."""
    if (pid is None) == (match is None):
        raise ValueError("watch() needs exactly one of pid and match")
    # One token per process: children inherit it, a nested `nlsr` run (its own parent) keeps its parent's token
    # only until it calls watch() itself, after which its own children carry its own.
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    if match is not None:
        os.environ[TOKEN_VAR] = token
    return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG, str(os.getpid()), str(pid or 0),
                             "1" if group else "0", match or "", str(poll_s), f"{TOKEN_VAR}={token}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
