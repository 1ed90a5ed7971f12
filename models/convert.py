"""Convert memories between layouts, and build a self-contained joint model.

    python -m models.convert --from official --input DIR --output DIR --base_model BASE [--layer L]
    python -m models.convert --to official --input DIR --output DIR
    python -m models.convert --joint --base_model BASE --memory DIR --output DIR --lmbda 0.25

The first two convert between the released implementation's memory layout and ours
(`models.official`); the third writes one Hugging Face causal LM holding the base model and the
memory (`models.joint.build`), which ``AutoModelForCausalLM.from_pretrained`` loads after ``import models``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--joint" in argv:
        from models.joint.build import main as build_joint
        return build_joint([arg for arg in argv if arg != "--joint"])
    from models.official import main as convert_official
    return convert_official(argv)


if __name__ == "__main__":
    from utils.cli import run

    run(lambda argv: sys.exit(main(argv)))  # a UsageError is a one-line message and exit status 2
