"""The settings of a memory in use, declared once: the memory, its weight ``lmbda``, its temperature.

Every entry point that uses a memory parses `MemoryArguments` (evaluate_joint, downstream.eval_qa, HaluEval,
StrategyQA, TruthfulQA, the demo, ``python -m models.convert --joint``; the lm-eval model builds one from its
``--model_args``) and hands it to the one loader, `models.joint.loading.load_joint`.

Two temperatures, two names. ``memory_temp`` is the temperature of the memory's logits,
``log_softmax(memory_logits / memory_temp)``. ``knn_temp`` is the temperature of the kNN distribution over
neighbour distances, ``softmax(-d / knn_temp)`` (kNN targets and the kNN-LM, `knn_utils`). The released
scripts spelled the memory's temperature ``--knn_temp`` in evaluate_joint and QA, so here ``--knn_temp`` is
an alias of ``--memory_temp``; in `knn_utils` it keeps its own meaning.

The default policy for ``lmbda`` (`resolve_lmbdas`), first that applies:

1. ``--lmbda`` (one or several values);
2. the value of a QA protocol preset that carries one (`downstream.qa_protocols`);
3. the value a joint directory records (``python -m models.convert --joint``), when it is the model;
4. the purpose's default: 0.25 for perplexity (``PERPLEXITY``: the paper's WikiText-103 runs and the
   kNN-LM's), 0.5 for generation, QA and judgments (``DOWNSTREAM``: the released eval_qa.sh, the paper's QA
   range 0.5 to 0.75). Building a joint directory has no default: the value it records serves every later use,
   so ``--lmbda`` is required there (``BUILD``).

``memory_temp``: ``--memory_temp``, else the joint directory's, else 1. Results record where both came from
(``lmbda_source``, ``memory_temp_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.arguments import BaseCheckArguments
from utils.cli import UsageError, check_finite_floats

PERPLEXITY, DOWNSTREAM, BUILD = "perplexity", "downstream", "build"
DEFAULT_LMBDA = {PERPLEXITY: 0.25, DOWNSTREAM: 0.5}  # BUILD: none, --lmbda is required
DEFAULT_MEMORY_TEMP = 1.0
MEMORY_TEMP_ALIAS_HELP = "--knn_temp is the released name of --memory_temp: the temperature of the memory's logits."


@dataclass
class MemoryArguments(BaseCheckArguments):
    """The memory in use: which one, its weight in the interpolation and the temperature of its logits."""

    memory: str | None = field(default=None, metadata={
        "aliases": ["--knn_generator_path"],
        "help": "The memory: an MLP memory directory (train_mlpmem_*), a released one, or a Memory Decoder (a causal "
                "LM directory sharing the base's tokenizer). --knn_generator_path is its released name. Not given when "
                "--model_name_or_path is a joint model directory (python -m models.convert --joint), which holds one."})
    lmbda: list[float] | None = field(default=None, metadata={
        "nargs": "+",
        "help": "Weight(s) of the memory in the interpolation, in [0, 1] (0: the base alone). Tools that score "
                "several settings score every value in one run; the demo, the lm-eval model and the joint builder "
                "take one. Default: a QA preset's, else a joint model's own, else 0.25 for perplexity and 0.5 for "
                "generation, QA and judgments (models/joint/settings.py)."})
    memory_temp: float | None = field(default=None, metadata={
        "aliases": ["--knn_temp"],
        "help": "Temperature T of the memory's logits, softmax(memory_logits / T). Default: a joint model's own, "
                f"else 1. {MEMORY_TEMP_ALIAS_HELP}"})
    use_neural_knn: bool = field(default=False, metadata={
        "help": "Released QA flag: use the memory. Implied by --memory or a joint model directory; needs one of them."})

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.memory_temp is not None:
            check_memory_temp(self.memory_temp)
        check_finite_floats(self)
        if self.lmbda is not None:
            check_lmbdas(self.lmbda)

    def one_lmbda(self, flag: str = "--lmbda") -> float | None:
        """The single ``lmbda`` of a tool that uses one (None: not given); several values are a `UsageError`."""
        if self.lmbda is not None and len(self.lmbda) > 1:
            raise UsageError(f"{flag} takes one value here, got {len(self.lmbda)} ({' '.join(map(str, self.lmbda))})")
        return None if self.lmbda is None else self.lmbda[0]


def check_lmbdas(lmbdas: list[float]) -> None:
    """``--lmbda`` holds at least one value, each in [0, 1] (written so that NaN fails)."""
    if not lmbdas:
        raise UsageError("--lmbda needs at least one value")
    for lmbda in lmbdas:
        if not 0 <= lmbda <= 1:
            raise UsageError(f"--lmbda values must be in [0, 1], got {lmbda}")


def check_memory_temp(memory_temp: float) -> None:
    if not 0 < memory_temp < math.inf:
        raise UsageError(f"--memory_temp (--knn_temp) must be a finite number > 0, got {memory_temp}")


def resolve_lmbdas(explicit: list[float] | None, purpose: str, preset: tuple[str, float] | None = None,
                   recorded: tuple[str, float] | None = None) -> tuple[list[float], str]:
    """The ``lmbda`` values in force and where they came from, by the policy of this module's docstring.

    ``preset`` and ``recorded`` are (source, value): a QA protocol preset's and a joint directory's.
    """
    if explicit:
        return list(explicit), "--lmbda"
    for found in (preset, recorded):
        if found is not None and found[1] is not None:
            return [float(found[1])], found[0]
    if purpose not in DEFAULT_LMBDA:
        raise UsageError("--lmbda is required: the joint directory records it for every later use")
    return [DEFAULT_LMBDA[purpose]], f"the default for {purpose}"


def resolve_memory_temp(explicit: float | None, recorded: tuple[str, float] | None = None) -> tuple[float, str]:
    """``--memory_temp``, else a joint directory's, else 1; and where it came from."""
    if explicit is not None:
        return explicit, "--memory_temp"
    if recorded is not None and recorded[1] is not None:
        return float(recorded[1]), recorded[0]
    return DEFAULT_MEMORY_TEMP, "the default"
