"""The joint model evaluated by perplexity (evaluate_joint.py): a frozen base LM interpolated with a trained memory.

For every scored row, one pass of the base LM gives its logits and what the memory reads (an MLP memory:
the feed-forward input of its block; a Memory Decoder scores the same windows itself:
`models.joint.memories.JointMemory.scored_inputs`). Then

    log p_lm  = log_softmax(lm_logits)
    log q     = log_softmax(memory_logits / memory_temp)
    log p     = logaddexp(log p_lm + log(1 - lmbda), log q + log lmbda)      for each lmbda

(`models.joint.interpolation`'s formula), so the base alone, the memory alone and the joint model for
every ``lmbda`` are scored on the same tokens. Perplexity needs only the gold token's probability, so each
distribution costs one log-sum-exp per row (`gold_log_probs`: the base's is the one its own perplexity
uses) and the formula is applied to (rows,) vectors, one per ``lmbda``: no (rows x vocab) interpolation is
built. Tokens/s of the base alone and of base + memory come from the same run: the memory forward (with
its log-sum-exp) and the interpolation are timed apart from the base forward.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate import PartialState

from models.joint.interpolation import ROWS_PER_SLICE, interpolate_log_probs
from models.joint.loading import load_joint
from models.joint.memories import JointMemory, as_joint_memory
from models.joint.settings import PERPLEXITY, MemoryArguments
from utils.arguments import SPLITS, DataArguments, PretrainedModelArguments
from utils.artifacts.dataset import load_split
from utils.cli import UsageError
from utils.distributed import process_state, synchronize
from utils.modeling import check_tokenizer, check_vocab
from utils.scoring import ScoredBatch, check_finite_loss, gather_window_totals, score_batches, token_nll, window_sums
from utils.windows import ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)


@dataclass
class JointArguments:
    """Where the results go, the batching, and the released script's compatibility flags (the memory and its settings
    are `models.joint.settings.MemoryArguments`)."""

    output_dir: str = field(metadata={"help": "Directory for joint_results.json (merged into all_results.json) "
                                              "and, for several --lmbda, lmbda_sweep.md / lmbda_sweep.png."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Windows per forward pass and process."})
    dataset_split_name: str | None = field(default=None, metadata={
        "help": "Split to evaluate (the released name of --eval_subset; takes precedence over it).",
        "choices": list(SPLITS)})
    do_test: bool = field(default=False, metadata={
        "help": "Released flag: evaluate the test split when no split is named."})
    do_eval: bool = field(default=False, metadata={
        "help": "Released flag: evaluate the validation split when no split is named."})
    report_to: str = field(default="none", metadata={
        "help": "Released flag; only 'none' is supported (results go to OUTPUT_DIR only).", "choices": ["none"]})

    def __post_init__(self):
        if self.per_device_eval_batch_size < 1:
            raise UsageError(f"--per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}")
        if self.do_test and self.do_eval:
            raise UsageError("Give --do_test (test split) or --do_eval (validation split), not both")
        implied = "test" if self.do_test else "validation" if self.do_eval else None
        if implied and self.dataset_split_name and implied != self.dataset_split_name:
            raise UsageError(f"--{'do_test' if self.do_test else 'do_eval'} evaluates the {implied} split, "
                             f"but --dataset_split_name is {self.dataset_split_name}")
        self.dataset_split_name = self.dataset_split_name or implied


def resolve_split(data_args: DataArguments, args: JointArguments) -> str:
    """The split to evaluate: --dataset_split_name (or --do_test / --do_eval), else --eval_subset."""
    return args.dataset_split_name or data_args.eval_subset


@dataclass
class JointNll:
    """Per-row negative log-likelihoods of one batch, and the seconds the memory side took."""

    memory: torch.Tensor  # (n,)
    joint: list[torch.Tensor]  # one (n,) per lmbda
    memory_seconds: float  # memory forward + its log-sum-exp
    interpolation_seconds: float  # all lmbdas together


def joint_nll(batch: ScoredBatch, lm_gold: torch.Tensor, memory: torch.nn.Module | JointMemory, lmbdas: list[float],
              memory_temp: float, memory_inputs: torch.Tensor | None = None) -> JointNll:
    """Memory-alone and joint NLL of each row of ``batch``, ``ROWS_PER_SLICE`` rows at a time.

    ``lm_gold`` (n,) is the base's ``log p_lm`` of each row's label (the negated NLL its perplexity sums);
    ``memory_inputs`` what the memory reads for the rows (`JointMemory.scored_inputs`; default: ``batch.hidden``).
    """
    memory = as_joint_memory(memory)
    inputs = batch.hidden if memory_inputs is None else memory_inputs
    device = batch.labels.device
    synchronize(device)
    start = time.perf_counter()
    mem_gold = torch.cat([memory.gold_log_probs(inputs[s : s + ROWS_PER_SLICE], batch.labels[s : s + ROWS_PER_SLICE],
                                                memory_temp)
                          for s in range(0, len(batch.rows), ROWS_PER_SLICE)])  # (n,)
    synchronize(device)
    middle = time.perf_counter()
    joint = [-interpolate_log_probs(lm_gold, mem_gold, lmbda) for lmbda in lmbdas]  # each (n,)
    synchronize(device)
    return JointNll(-mem_gold, joint, middle - start, time.perf_counter() - middle)


def evaluate_joint(model_args: PretrainedModelArguments, data_args: DataArguments, args: JointArguments,
                   memory_args: MemoryArguments, state: PartialState | None = None) -> dict:
    """Base, memory-alone and joint perplexity (for every lmbda) over the scored rows of one split.

    The base and the memory come from `models.joint.loading.load_joint` (a joint directory as the model included),
    checked against each other and against the dataset's tokenizer; the results record the check (``base_check``)
    and where the settings came from.
    """
    state = state or process_state()
    split = load_split(data_args.dataset_name, resolve_split(data_args, args))
    check_tokenizer(model_args, split.meta, data_args.dataset_name)
    loaded = load_joint(model_args, memory_args, PERPLEXITY,
                        tokenizer_fingerprint=split.meta["tokenizer"]["fingerprint"])
    if loaded.memory is None:
        raise UsageError("Give --memory (--knn_generator_path), or a joint model directory as --model_name_or_path")
    check_vocab(loaded.model, split.meta, data_args.dataset_name)
    model, memory, lmbdas, memory_temp = loaded.model, loaded.memory, loaded.lmbdas, loaded.memory_temp
    windows = split.windows[: data_args.max_eval_samples]
    logger.info("Joint model over %d windows of %s", len(windows), split.split)

    loaded.to(state.device)
    base_totals: dict[int, float] = {}
    memory_totals: dict[int, float] = {}
    joint_totals: list[dict[int, float]] = [{} for _ in lmbdas]
    base_seconds = memory_seconds = interpolation_seconds = 0.0
    batches = score_batches(model, split.tokens, windows, args.per_device_eval_batch_size, state.process_index,
                            state.num_processes, layer=memory.capture_layer, show_progress=state.is_main_process)
    scored = memory.scored_inputs(batches, split.tokens, windows, args.per_device_eval_batch_size, state)
    pairs = iter(scored)
    with torch.no_grad():
        while True:
            start = time.perf_counter()
            batch, memory_inputs = next(pairs, (None, None))
            if batch is None:
                break
            base_nll = token_nll(batch.logits, batch.labels)  # (n,)
            base_totals.update(window_sums(base_nll, batch, windows))
            synchronize(state.device)
            base_seconds += time.perf_counter() - start
            nll = joint_nll(batch, -base_nll, memory, lmbdas, memory_temp, memory_inputs)
            memory_seconds += nll.memory_seconds
            interpolation_seconds += nll.interpolation_seconds
            memory_totals.update(window_sums(nll.memory, batch, windows))
            for totals, joint in zip(joint_totals, nll.joint):
                totals.update(window_sums(joint, batch, windows))

    # A memory that scored the windows itself did so inside next(pairs): its time is the memory's, not the base's.
    base_seconds, memory_seconds = base_seconds - scored.seconds, memory_seconds + scored.seconds
    num_rows = int(windows[-1, ROW_END] - windows[0, ROW_BEGIN])

    def loss(totals: dict[int, float], whose: str, cause: str) -> float:
        return check_finite_loss(float(gather_window_totals(totals, len(windows), state).sum() / num_rows), whose, cause)

    memory_cause = (f"its weights may be corrupt (--memory {loaded.record['memory']}), or --memory_temp "
                    f"{memory_temp} is too small")
    base_loss = loss(base_totals, "The base model's",
                     f"its weights may be corrupt (--model_name_or_path {model_args.model_name_or_path})")
    memory_loss = loss(memory_totals, "The memory's", memory_cause)
    sweep = [{"lmbda": lmbda, "perplexity": math.exp(joint_loss), "eval_loss": joint_loss}
             for lmbda, joint_loss in ((lmbda, loss(t, f"The joint model's (lmbda {lmbda})", memory_cause))
                                       for lmbda, t in zip(lmbdas, joint_totals))]
    # Base + memory as deployed: one interpolation per token, not the whole sweep.
    joint_seconds = base_seconds + memory_seconds + interpolation_seconds / len(lmbdas)
    record = loaded.record
    return {
        "eval_subset": split.split, "perplexity": sweep[0]["perplexity"], "eval_loss": sweep[0]["eval_loss"],
        "lmbda": lmbdas[0], "lmbda_source": record["lmbda_source"], "base_perplexity": math.exp(base_loss),
        "base_eval_loss": base_loss, "memory_perplexity": math.exp(memory_loss), "memory_eval_loss": memory_loss,
        "lmbda_sweep": sweep, "memory_temp": memory_temp, "memory_temp_source": record["memory_temp_source"],
        "memory_layer": memory.layer, "memory_kind": memory.kind, "memory": record["memory"],
        "joint_dir": record["joint_dir"],
        "joint_dir_verified": record["joint_dir_verified"], "dtype": record["dtype"],
        "base_check": record["base_check"],
        "eval_tokens": num_rows, "eval_windows": len(windows), "num_processes": state.num_processes,
        "base_seconds": round(base_seconds, 3), "memory_seconds": round(memory_seconds, 3),
        "interpolation_seconds": round(interpolation_seconds, 3),
        "base_tokens_per_second": round(num_rows / base_seconds, 2),
        "joint_tokens_per_second": round(num_rows / joint_seconds, 2), "threads": torch.get_num_threads(),
    }


def sweep_table(metrics: dict) -> str:
    """The lmbda sweep as a Markdown table, with the base and the memory alone as reference rows."""
    lines = [f"Perplexity on {metrics['eval_subset']} ({metrics['eval_tokens']} tokens, "
             f"memory_temp {metrics['memory_temp']:g})",
             "", "| lmbda | perplexity |", "|---|---|",
             f"| base alone (0) | {metrics['base_perplexity']:.4f} |"]
    lines += [f"| {entry['lmbda']:g} | {entry['perplexity']:.4f} |" for entry in metrics["lmbda_sweep"]]
    lines.append(f"| memory alone (1) | {metrics['memory_perplexity']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(metrics: dict, path: str) -> None:
    """Perplexity against lmbda, with the base model as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(metrics["lmbda_sweep"], key=lambda entry: entry["lmbda"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([e["lmbda"] for e in sweep], [e["perplexity"] for e in sweep], marker="o", label="base + memory")
    ax.axhline(metrics["base_perplexity"], color="gray", linestyle="--", label="base alone")
    ax.set_xlabel("lmbda (weight of the memory)")
    ax.set_ylabel(f"perplexity ({metrics['eval_subset']})")
    ax.legend()
    fig.tight_layout()
    partial = path + ".partial.png"
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    os.replace(partial, path)


SWEEP_FILES = ("lmbda_sweep.md", "lmbda_sweep.png")


def save_sweep(output_dir: str, metrics: dict) -> None:
    """``lmbda_sweep.md`` and ``lmbda_sweep.png`` in ``output_dir`` for a sweep of several ``lmbda``; for one value,
    the files an earlier sweep left there are removed, so that no stale table sits beside the new results."""
    os.makedirs(output_dir, exist_ok=True)
    table, plot = (os.path.join(output_dir, name) for name in SWEEP_FILES)
    if len(metrics["lmbda_sweep"]) < 2:
        for stale in (table, plot):
            if os.path.exists(stale):
                os.remove(stale)
                logger.info("Removed %s, left by an earlier sweep", stale)
        return
    with open(table + ".partial", "w") as f:
        f.write(sweep_table(metrics))
    os.replace(table + ".partial", table)
    plot_sweep(metrics, plot)
