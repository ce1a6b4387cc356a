"""Method registries: one small name → implementation table per family, as lm-evaluation-harness registers tasks.

A family (alignment methods, fine-tuning-stage defenses, neuron scorers, post-fine-tuning realigners) is a
`Registry`. Config validation, CLI `choices`, the DAG description (`nlsr.dag`) and the stage code all read it, so
a method's name is written once. An unknown name fails with the list of valid ones (`UnknownMethod`).

Two ways to register, with the same effect:
- the decorator, for code that is imported anyway (a plugin, a notebook, a test)::

      from nlsr.methods import REALIGNERS

      @REALIGNERS.register("my-defense", inputs={"base": "wbase", "finetuned": "finetune"})
      def my_defense(paths, cfg, out): ...

- `add(name, "module:function", ...)` for the built-in methods (`nlsr/methods.py`): the implementation module is
  imported on first use, so validating a config or building the CLI never imports torch.

Pure Python; no torch, no pydantic.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import NLSRError


class UnknownMethod(NLSRError, ValueError):
    """A method name that its family does not hold; the message lists the valid names.

    A ValueError too, so pydantic validators turn it into a field error naming the config field.
    """


@dataclass
class Entry:
    """One registered method: its name, its implementation (an object or a 'module:attr' path) and metadata."""
    name: str
    target: Any
    meta: dict = field(default_factory=dict)

    def load(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            self.target = getattr(importlib.import_module(module), attr)
        return self.target


class Registry:
    """name → Entry for one family; insertion order is the order of `names()` (CLI choices, reports)."""

    def __init__(self, family: str, field_name: str):
        self.family = family          # e.g. "post-fine-tuning realigner"
        self.field_name = field_name  # e.g. "realign.method": named in errors
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: Any, **meta) -> Entry:
        """Register `target` (an object or a lazily imported 'module:attr') under `name`."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.family}: a method name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered")
        self._entries[name] = Entry(name, target, dict(meta))
        return self._entries[name]

    def register(self, name: str, **meta) -> Callable:
        """Decorator: register the decorated function or class under `name` (returns it unchanged)."""
        def deco(obj):
            self.add(name, obj, **meta)
            return obj
        return deco

    def unregister(self, name: str) -> None:
        """Remove a method (tests and plugins that register a temporary one clean up with this)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str) -> str:
        """`name` itself, or UnknownMethod naming the field and the valid names."""
        if name not in self._entries:
            raise UnknownMethod(f"unknown {self.family} {name!r} ({self.field_name}); expected one of "
                                f"{list(self._entries)}")
        return name

    def entry(self, name: str) -> Entry:
        return self._entries[self.check(name)]

    def get(self, name: str) -> Any:
        """The implementation of `name` (imported on first use)."""
        return self.entry(name).load()

    def meta(self, name: str) -> dict:
        return self.entry(name).meta
