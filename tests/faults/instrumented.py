"""Run an entry point as ``python -m`` would, with test instrumentation that changes nothing it computes.

    python -m tests.faults.instrumented [--pause_after MODULE:ATTR SECONDS] [--count_windows FILE] MODULE [ARGS...]

``--pause_after`` sleeps after every call of one library function (``utils.artifacts.datastore:DatastoreWriter.write``),
so that a test polling the files the run writes can SIGKILL it in mid-run: the run only goes slower.
``--count_windows`` appends to FILE, when the process exits, how many windows went through the language
model's forward pass in it (one line per process under ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import runpy
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def count_lm_windows() -> Iterator[list[int]]:
    """Count the sequences (windows) passed through any causal LM's forward pass inside the block.

    Yields a one-element list holding the count. Only models with an LM head are counted, not their inner
    transformer body, so a window scored once counts once.
    """
    count = [0]

    def hook(module, args, kwargs, output):
        if hasattr(module, "lm_head"):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            count[0] += int(input_ids.shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def pause_after(target: str, seconds: float) -> None:
    """Replace ``module:attr.path`` by a wrapper that calls it, then sleeps ``seconds``."""
    module_name, path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)

    @functools.wraps(original)
    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        time.sleep(seconds)
        return result

    setattr(owner, name, paused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--pause_after", nargs=2, metavar=("MODULE:ATTR", "SECONDS"))
    parser.add_argument("--count_windows", metavar="FILE")
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.pause_after:
        pause_after(args.pause_after[0], float(args.pause_after[1]))
    if args.count_windows:
        counter = count_lm_windows()
        count = counter.__enter__()

        def record() -> None:
            with open(args.count_windows, "a") as f:
                f.write(f"{count[0]}\n")

        atexit.register(record)
    sys.argv = [args.module, *args.args]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
