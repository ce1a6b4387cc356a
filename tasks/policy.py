"""Prefect cache policy keyed on the artifact store, retry rules, and the failure-injection testing hook.

Caching, two layers that agree:
- the artifact store (`nlsr.artifacts`) is the truth: a stage whose `_SUCCESS` exists is never recomputed, even
  when Prefect's result storage is wiped;
- Prefect's cache uses the same key (`StageCache`, no RUN_ID, no task source), so a rerun shows finished stages
  as `Cached` in the UI without even entering the task body. Cache records live under
  `<artifact_root>/.prefect/`; a record whose artifact has disappeared (someone deleted the folder) is dropped
  before Prefect can use it, so Prefect never returns a reference to a missing folder.

Locking: two concurrent cells asking for the same key both enter the task (Prefect's default READ_COMMITTED),
but the body runs `ArtifactStore.run`, which holds a file lock on the key: the second waits, then finds
`_SUCCESS` and returns at once. We do not use Prefect's SERIALIZABLE isolation + FileSystemLockManager: it
would guard the Prefect cache record only, not callers outside Prefect (the `nlsr` stage commands, notebooks),
and its lock files would have to share a folder with Prefect's result storage anyway.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from nlsr.artifacts import ArtifactStore, Ref
from nlsr.config import ExperimentConfig
from nlsr.errors import NLSRError

from .keys import key_for, report_key

FAIL_ENV = "NLSR_FAIL_STAGE"


class InjectedFailure(RuntimeError):
    """Raised by a stage named in NLSR_FAIL_STAGE (testing hook for resume); never retried."""


def prefect_dir(root: str | Path) -> Path:
    return ArtifactStore(root).root / ".prefect"


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


@dataclass
class StageCache(CachePolicy):
    """Cache key = `<stage>-<artifact key>`; drops a record whose artifact folder is gone."""
    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw) -> str | None:
        key = call_key(self.stage, inputs)
        cache_key = f"{self.stage}-{key}"
        store = ArtifactStore(inputs["cfg"].artifact_root)
        if not store.done(self.stage, key) and self.key_storage is not None:
            (Path(self.key_storage) / cache_key).unlink(missing_ok=True)
        return cache_key


def bind(task, stage: str, root: str | Path):
    """The task with its cache records and results stored under this artifact root."""
    records = prefect_dir(root)
    policy = StageCache(stage=stage).configure(key_storage=records / "cache-keys")
    return task.with_options(cache_policy=policy, result_storage=records / "results", persist_result=True)


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
