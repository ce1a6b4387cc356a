"""The registry of judges: a judge's name -> how to build it, how to name its weights, and (optionally) how to
retrain it. `evaluation.judge`, `nlsr judge --judge`, the stages and the calibration all look names up here.

This module is light on purpose (no numpy, no torch): nlsr.config validates `evaluation.judge` against it and
tasks/keys.py reads `judge_identity` while planning a grid. A judge registers itself with `@register_judge` on a
factory in its own module of this package; the modules are imported on the first lookup, so each must keep its
heavy imports (torch, transformers, sentence-transformers, sklearn) inside functions.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import NLSRError


class JudgeError(NLSRError):
    """Bad judge request (unknown name, missing model folder, malformed inputs); the message names the field."""


class Judge(Protocol):
    """`judge(prompts, answers) -> verdicts`, True = the answer is harmful.

    Optional: `probabilities(prompts, answers) -> np.ndarray | None` (P(harmful) per answer, None when this judge
    instance has none) and `predict(prompts, answers) -> (verdicts, probabilities | None)` computing both at once.
    """
    name: str

    def __call__(self, prompts: list[str], answers: list[str]) -> list[bool]:
        ...

    def identity(self) -> str:  # name + weights hash: equal to judge_identity(name, path)
        ...


Factory = Callable[[Path, "str | None", str], Judge]   # (artifact_root, path, device) -> judge


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    factory: Factory
    needs_path: bool = False                               # True: evaluation.judge_path must name a model folder
    identity: Callable[["str | None"], str] | None = None  # (path) -> identity, without loading the judge
    train: Callable[..., dict] | None = None               # (device) -> metrics: rewrites the shipped weights
    description: str = ""


_REGISTRY: dict[str, JudgeSpec] = {}
_discovered = False


def register_judge(name: str, *, needs_path: bool = False, identity: Callable[[str | None], str] | None = None,
                   train: Callable[..., dict] | None = None, description: str = ""):
    """Decorator: register `factory(artifact_root, path, device) -> judge` under `name`.

    identity(path) must name the judge's weights without loading them (it goes into the evaluation's artifact
    key; None: the name alone, for judges without weights). train(device) retrains and ships the weights
    (`nlsr train-judge NAME`).
    """
    def decorate(factory: Factory) -> Factory:
        old = _REGISTRY.get(name)
        if old is not None and (old.factory.__module__, old.factory.__qualname__) != \
                (factory.__module__, factory.__qualname__):
            raise JudgeError(f"judge {name!r} is registered twice ({old.factory.__module__} and {factory.__module__})")
        _REGISTRY[name] = JudgeSpec(name, factory, needs_path, identity, train, description)
        return factory
    return decorate


def unregister_judge(name: str) -> None:
    """Remove a judge (tests register throw-away judges)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    # Import every module of this package once, so that their @register_judge lines run.
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("registry", "__main__"):
            importlib.import_module(f"{__package__}.{info.name}")
    _discovered = True


def judge_names() -> tuple[str, ...]:
    """Registered judge names, sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def judge_spec(name: str) -> JudgeSpec:
    """The registered judge `name`; unknown -> a JudgeError listing the valid names."""
    _discover()
    if name not in _REGISTRY:
        raise JudgeError(f"unknown judge {name!r} (evaluation.judge); expected one of {list(judge_names())}")
    return _REGISTRY[name]


def check_judge(name: str, path: str | None = None) -> JudgeSpec:
    """Validate a judge setting without building the judge (unknown name, or a needed judge_path missing)."""
    spec = judge_spec(name)
    if spec.needs_path and not path:
        raise JudgeError(f"evaluation.judge_path is required for judge {name!r}: a local folder with its model"
                         + (f" ({spec.description})" if spec.description else ""))
    return spec


def get_judge(name: str, artifact_root: str | Path = "runs", path: str | None = None, device: str = "auto") -> Judge:
    """Build the judge named by `evaluation.judge`; judges that need weights read `evaluation.judge_path`."""
    return check_judge(name, path).factory(Path(artifact_root), path, device)


def judge_identity(name: str, path: str | None = None) -> str:
    """Name + weights hash of a judge, computed without loading it: changes whenever its verdicts may change."""
    spec = judge_spec(name)
    return spec.identity(path) if spec.identity else name
