"""What the runner runs: a `Run` (one call of an entry point) and a `Stage` (an entry point, its flags, its runs).

A stage's flags are read from its entry point's own parser (`hf_parser` over its argument dataclasses, or
its argparse ``build_parser``), so a recipe section accepts exactly the flags the entry point does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

CHOSEN = "<chosen on validation>"  # a value read from a recorded choice that is not made yet


@dataclass
class Run:
    """One call of an entry point: its settings (flag -> value, the argv), what marks it complete, what it reads."""

    name: str
    stage: str
    module: str
    settings: dict
    done: Path
    outputs: dict[str, Path]
    inputs: dict[str, str | Path] = field(default_factory=dict)
    results: Path | None = None
    positional: list[str] = field(default_factory=list)
    nproc: int = 1
    always: bool = False  # rerun every time (the summary only reads)
    switches: frozenset[str] = frozenset()  # flags that take no value (argparse's store_true), set by the stage

    @property
    def pending(self) -> bool:
        """Whether a setting waits for a choice recorded by an earlier run."""
        return CHOSEN in (self.settings.values()) or CHOSEN in self.positional

    def argv(self) -> list[str]:
        """The command line: ``--flag value`` (lists as several values, booleans as ``true`` / ``false``, which
        HfArgumentParser reads for ``bool`` and ``bool | None`` fields alike), a switch alone when it is on."""
        argv = list(self.positional)
        for flag, value in self.settings.items():
            if value is None or (flag in self.switches and value is False):
                continue
            if flag in self.switches:
                argv.append(f"--{flag}")
                continue
            values = value if isinstance(value, list) else [value]
            argv += [f"--{flag}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
        return argv

    def command(self) -> str:
        launcher = (f"accelerate launch --multi_gpu --num_processes {self.nproc} -m" if self.nproc > 1
                    else "python -m")
        return f"{launcher} {self.module} {shlex.join(self.argv())}"


@dataclass
class Stage:
    """A stage: its entry point, its flags, the flags the runner sets, and how it makes its runs."""

    name: str
    module: str
    parser: Callable[[], argparse.ArgumentParser]
    build: Callable[..., list[Run]]  # (Context, the stage's expanded section) -> its runs
    owned: frozenset[str] = frozenset()
    runner_keys: frozenset[str] = frozenset()

    def flags(self) -> frozenset[str]:
        return parser_flags(self.parser)

    def switches(self) -> frozenset[str]:
        return parser_switches(self.parser)


@cache
def parser_flags(make_parser: Callable[[], argparse.ArgumentParser]) -> frozenset[str]:
    """The long flags of a parser (without HF's dashed aliases and the ``--no_X`` negations of its booleans)."""
    parser = make_parser()
    flags = {option[2:] for action in parser._actions for option in action.option_strings
             if option.startswith("--") and "-" not in option[2:] and option != "--help"}
    return frozenset(flag for flag in flags if not (flag.startswith("no_") and flag[3:] in flags))


@cache
def parser_switches(make_parser: Callable[[], argparse.ArgumentParser]) -> frozenset[str]:
    """The long flags of a parser that take no value (store_true / store_false)."""
    return frozenset(option[2:] for action in make_parser()._actions if action.nargs == 0
                     for option in action.option_strings if option.startswith("--"))


def hf_parser(*dataclass_paths: str) -> Callable[[], argparse.ArgumentParser]:
    """A factory of the HfArgumentParser over the dataclasses named ``module:Class`` (imported when called)."""

    def make() -> argparse.ArgumentParser:
        from transformers import HfArgumentParser

        classes = []
        for path in dataclass_paths:
            module, name = path.split(":")
            classes.append(getattr(importlib.import_module(module), name))
        return HfArgumentParser(tuple(classes))

    return make


def function_parser(path: str) -> Callable[[], argparse.ArgumentParser]:
    def make() -> argparse.ArgumentParser:
        module, name = path.split(":")
        return getattr(importlib.import_module(module), name)()

    return make


@cache
def field_default(path: str, name: str):
    """The default of the field ``name`` of the dataclass ``module:Class`` (where the code defines it, once)."""
    module, cls = path.split(":")
    return next(f.default for f in dataclasses.fields(getattr(importlib.import_module(module), cls)) if f.name == name)
