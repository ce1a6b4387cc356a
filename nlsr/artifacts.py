"""The content-addressed artifact store: every stage output lives in `<root>/<stage>/<key>/`.

`key` hashes the stage's own config, its code version and the keys of its inputs (see `stage_key`), so equal
work has one folder, whoever asks for it. A stage is written into a temporary folder, renamed into place, and
only then marked finished by a `_SUCCESS` file (config, package versions, timings, metrics). A folder without
`_SUCCESS` does not exist: readers ignore it and the next writer deletes it.

Before a finished artifact is reused, its files are checked against the sizes and hashes recorded in `_SUCCESS`
(`nlsr.integrity`); a damaged artifact is moved aside to `<root>/<stage>/.damaged-<key>-<time>/` (never deleted:
it may be evidence) and computed again, with one warning naming it.

Two processes on one host (or on a shared file system with working `fcntl` locks) never compute the same key
twice: `run` holds a file lock on the key while it checks, computes and publishes. Every hit and every
computation is appended to `<root>/_events.jsonl`, which is how tests and users check what was recomputed.

Pure library code: no Prefect, no MLflow.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from .atomic import write_json
from .config import stable_hash
from .errors import NLSRError
from .integrity import damage, manifest

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
EVENTS = "_events.jsonl"
LOCKS = ".locks"
TMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = ".damaged-"
# Packages whose versions go into every _SUCCESS file (the ones that can change a stage's output).
TRACKED_PACKAGES = ("nlsr", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors")


class ArtifactError(NLSRError):
    """A stage produced nothing, or an artifact is missing; the message names the stage, key and folder."""


class Ref(BaseModel):
    """What a stage hands downstream: where its output is and its small metrics. Never tensors."""
    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    path: str
    metrics: dict[str, Any] = Field(default_factory=dict)

    def file(self, name: str) -> Path:
        return Path(self.path) / name


def stage_key(stage: str, version: str | int, config: Any, inputs: dict[str, str | None] | None = None,
              length: int = 16) -> str:
    """Content address of a stage output: its config, its code version, and the keys of its inputs."""
    return stable_hash({"stage": stage, "version": str(version), "config": config, "inputs": inputs or {}}, length)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class ArtifactStore:
    """`<root>/<stage>/<key>/` folders, published atomically and marked by `_SUCCESS`."""

    def __init__(self, root: str | Path):
        if not str(root).strip():  # Path("") is the current folder: never scatter a store there by accident
            raise ArtifactError("artifact root is empty; expected a folder such as 'runs'")
        self.root = Path(root).expanduser().resolve()

    # ---------------------------------------------------------------------------------------- lookups

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / SUCCESS).is_file()

    def meta(self, stage: str, key: str) -> dict:
        marker = self.path(stage, key) / SUCCESS
        if not marker.is_file():
            raise ArtifactError(f"no finished artifact {stage}/{key} under {self.root} (missing {marker})")
        return json.loads(marker.read_text())

    def ref(self, stage: str, key: str) -> Ref:
        return Ref(stage=stage, key=key, path=str(self.path(stage, key)), metrics=self.meta(stage, key)["metrics"])

    def keys(self, stage: str) -> list[str]:
        """Finished keys of one stage, oldest first."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        done = [p for p in folder.iterdir() if not p.name.startswith(".") and (p / SUCCESS).is_file()]
        return [p.name for p in sorted(done, key=lambda p: (p / SUCCESS).stat().st_mtime)]

    def events(self) -> list[dict]:
        path = self.root / EVENTS
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ---------------------------------------------------------------------------------------- writing

    def lock(self, stage: str, key: str) -> FileLock:
        """A cross-process lock on one key (a lock file outside the artifact folder, so it never gets published)."""
        path = self.root / LOCKS / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def run(self, stage: str, key: str, fn: Callable[[Path], dict | None], meta: dict | None = None,
            output: str | None = None) -> Ref:
        """Return the finished artifact, computing it with `fn(out)` first if needed. Idempotent.

        `fn` gets a path that does not exist yet (`output` names a file inside the temporary folder for stages
        whose output is one file; otherwise the path is the folder itself) and returns a metrics dict.
        `meta` (the stage config, input keys...) is recorded in `_SUCCESS`.
        """
        if self.done(stage, key) and not self.damage(stage, key):
            self._event("hit", stage, key)
            return self.ref(stage, key)
        with self.lock(stage, key):
            if self.done(stage, key):  # another process finished while we waited, or the artifact is damaged
                problems = self.damage(stage, key)
                if not problems:
                    self._event("hit", stage, key)
                    return self.ref(stage, key)
                self.quarantine(stage, key, problems)
            self.clean(stage, key)
            return self._compute(stage, key, fn, meta or {}, output)

    def damage(self, stage: str, key: str, full: bool | None = None) -> list[str]:
        """What is wrong with a finished artifact (empty: intact): files missing, resized or changed since
        `_SUCCESS` recorded them. Sizes always; hashes of small files, of all with `full` / NLSR_VERIFY=full."""
        try:
            recorded = self.meta(stage, key).get("files")
        except (ValueError, OSError) as err:  # a garbled or unreadable _SUCCESS
            return [f"{SUCCESS} is unreadable ({err})"]
        if recorded is None:  # written before manifests existed: nothing to compare with
            return []
        return damage(self.path(stage, key), recorded, full)

    def quarantine(self, stage: str, key: str, problems: list[str]) -> Path:
        """Move a damaged artifact aside (call with the key's lock held); one warning line names it."""
        folder = self.path(stage, key)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = folder.parent / f"{DAMAGED_PREFIX}{key}-{stamp}-{uuid.uuid4().hex[:6]}"
        folder.rename(aside)
        log.warning("damaged artifact %s (%s): moved to %s, recomputing", folder, "; ".join(problems), aside)
        self._event("damaged", stage, key, problems=problems, moved_to=str(aside))
        return aside

    def _compute(self, stage: str, key: str, fn, meta: dict, output: str | None) -> Ref:
        final = self.path(stage, key)
        tmp = final.parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        # The stage gets a path that does not exist yet: library code that writes with atomic_dir() (which
        # discards its copy when the target exists) then publishes into our temporary folder as usual.
        work = tmp / "out"
        started, t0 = _now(), time.perf_counter()
        self._event("start", stage, key)
        try:
            if output:
                work.mkdir()
                metrics = fn(work / output) or {}
            else:
                metrics = fn(work) or {}
            if not work.is_dir() or not any(work.iterdir()):
                raise ArtifactError(f"stage {stage} ({key}) wrote nothing to {work}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            self._event("failed", stage, key)
            raise
        wall = time.perf_counter() - t0
        _relocate_reports(work, str(work), str(final))
        work.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        metrics = _relocate(metrics, str(work), str(final))
        record = {"stage": stage, "key": key, **meta, "metrics": _jsonable(metrics), "files": manifest(final),
                  "versions": package_versions(),
                  "timings": {"started": started, "finished": _now(), "wall_s": round(wall, 3)},
                  "host": socket.gethostname(), "pid": os.getpid(), "run_uid": uuid.uuid4().hex}
        write_json(record, final / SUCCESS)  # last: its presence means "finished"
        self._event("computed", stage, key, wall_s=round(wall, 3))
        return self.ref(stage, key)

    # ---------------------------------------------------------------------------------------- cleaning

    def clean(self, stage: str, key: str | None = None) -> list[Path]:
        """Delete partial outputs of one stage (or one key): temporary folders and folders without `_SUCCESS`.

        Call it with the key's lock held (as `run` does), or when no writer is running: a temporary folder of
        a live writer looks exactly like the leftovers of a crashed one. It takes a stage name because the
        root also holds folders that are not stages (e.g. `models/`).
        """
        folder = self.root / stage
        if not folder.is_dir():
            return []
        removed = []
        for p in folder.iterdir():
            is_tmp = p.name.startswith(f"{TMP_PREFIX}{key or ''}")
            is_partial = (not p.name.startswith(".") and (key is None or p.name == key) and p.is_dir()
                          and not (p / SUCCESS).is_file())
            if is_tmp or is_partial:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
                self._event("cleaned", stage, p.name)
        return removed

    def _event(self, event: str, stage: str, key: str, **extra) -> None:
        # One short line per write, appended with O_APPEND: lines from concurrent processes do not interleave.
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"event": event, "stage": stage, "key": key, "time": _now(), "pid": os.getpid(),
                           **extra}) + "\n"
        fd = os.open(self.root / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _jsonable(obj: Any) -> Any:
    """Metrics as plain JSON (tuples of losses become lists; numpy / torch scalars become floats)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _relocate_reports(folder: Path, old: str, new: str) -> None:
    """The stage's own reports (`*_report.json`, e.g. realign_report.json's "out") name the folder's final place."""
    for path in folder.rglob("*_report.json"):
        report = json.loads(path.read_text())
        moved = _relocate(report, old, new)
        if moved != report:
            write_json(moved, path)


def _relocate(obj, old: str, new: str):
    """Paths a stage reported inside its temporary folder, rewritten to where the folder now lives."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + os.sep) else obj
    if isinstance(obj, dict):
        return {k: _relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_relocate(v, old, new) for v in obj)
    return obj
