"""How stage tasks cache, retry, and the failure-injection testing hook.

Caching: the artifact store (`nlsr.artifacts`) is the only cache. A stage whose `_SUCCESS` exists and whose files
still match their recorded sizes and hashes is never recomputed. Prefect keeps no cache records and persists no
task results: a persisted result is a pickle in shared storage (in the compose stack, the volume every worker
reads), and unpickling a planted file runs its code; a Prefect cache hit would also skip the integrity check.
A reused stage shows as `Completed` in the Prefect UI, and its log line says "reused (artifact store hit)".

Locking: two concurrent cells asking for the same key both enter the task, but the body runs `ArtifactStore.run`,
which holds a file lock on the key: the second waits, then finds `_SUCCESS` and returns at once. The lock guards
every caller, in Prefect or not (the `nlsr` stage commands, notebooks).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE

from nlsr.artifacts import Ref
from nlsr.config import ExperimentConfig
from nlsr.errors import NLSRError

from .keys import key_for, report_key

FAIL_ENV = "NLSR_FAIL_STAGE"


class InjectedFailure(RuntimeError):
    """Raised by a stage named in NLSR_FAIL_STAGE (testing hook for resume); never retried."""


def stage_inputs(params: dict[str, Any]) -> dict[str, str | None]:
    """Input keys of a stage call, by parameter name: every parameter except cfg and method is a Ref (or None);
    a realigner's `inputs` dict counts as its own parameters."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if k == "inputs" and isinstance(v, dict):
            flat.update(v)
        elif k not in ("cfg", "method"):
            flat[k] = v
    return {k: (v.key if isinstance(v, Ref) else None) for k, v in flat.items()}


def call_key(stage: str, params: dict[str, Any]) -> str:
    cfg: ExperimentConfig = params["cfg"]
    if stage == "report":  # its inputs are a dict of evaluation refs, by variant
        return report_key(cfg, {v: ref.key for v, ref in params["evals"].items()})
    return key_for(stage, cfg, stage_inputs(params), params.get("method"))


def bind(task, stage: str, root: str | Path):
    """The task as the cell runs it: no Prefect cache, no persisted (pickled) result; `stage` and `root` are
    kept for callers (the artifact store under `root` is the cache)."""
    return task.with_options(cache_policy=NO_CACHE, persist_result=False)


# --------------------------------------------------------------------------------------------- retries

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def is_transient(exc: BaseException) -> bool:
    """Worth retrying as is: I/O and network hiccups. Never OOM (same settings, same OOM), bad configs or data
    (NLSRError), or the injected test failure."""
    if is_oom(exc) or isinstance(exc, (NLSRError, InjectedFailure)):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only transient errors."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we classify, not handle
        return is_transient(exc)
    return False


# --------------------------------------------------------------------------------------------- testing hook

def maybe_fail(stage: str, out: Path) -> None:
    """Testing hook: NLSR_FAIL_STAGE=finetune (comma-separated stage names) makes that stage fail after writing
    a partial output, as a crash would. Resume tests use it; it has no other purpose."""
    wanted = {s.strip() for s in os.environ.get(FAIL_ENV, "").split(",") if s.strip()}
    if stage in wanted:
        out.mkdir(parents=True, exist_ok=True)
        (out / "partial.txt").write_text("a crash left this behind\n")
        raise InjectedFailure(f"{FAIL_ENV}={os.environ[FAIL_ENV]}: stage {stage} failed on purpose")
