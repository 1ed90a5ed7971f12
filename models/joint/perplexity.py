"""The joint model evaluated by perplexity (evaluate_joint.py): a frozen base LM interpolated with a trained memory.

For every scored row, one pass of the base LM gives its logits and the hidden state the memory reads
(the feed-forward input of block ``memory.config.layer``). Then

    log p_lm  = log_softmax(lm_logits)
    log q     = log_softmax(memory(hidden) / knn_temp)
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

from models.joint.causal_lm import load_base_and_memory
from models.joint.interpolation import (ROWS_PER_SLICE, check_lmbdas, interpolate_log_probs, lmbda_choice,
                                       memory_gold_log_probs)
from models.joint.token_memory import is_token_memory, with_token_memory_logits
from utils.arguments import SPLITS, DataArguments, PretrainedModelArguments
from utils.artifacts.dataset import load_split
from utils.cli import UsageError, check_finite_floats
from utils.distributed import process_state, synchronize
from utils.modeling import check_tokenizer, check_vocab, load_model_for_dataset
from utils.scoring import ScoredBatch, check_finite_loss, gather_window_totals, score_batches, token_nll, window_sums
from utils.windows import ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)


@dataclass
class JointArguments:
    """The memory, the interpolation settings and the released script's compatibility flags."""

    output_dir: str = field(metadata={"help": "Directory for joint_results.json (merged into all_results.json) "
                                              "and, for several --lmbda, lmbda_sweep.md / lmbda_sweep.png."})
    knn_generator_path: str | None = field(default=None, metadata={
        "help": "The memory: an MLP memory directory (train_mlpmem_*) or a Memory Decoder (a causal LM directory "
                "sharing the base's tokenizer). Not given when --model_name_or_path is a joint model directory "
                "(python -m models.convert --joint), which holds its memory."})
    lmbda: list[float] | None = field(default=None, metadata={
        "help": "Weight(s) of the memory in the interpolation (0: the base LM alone). Several values, e.g. "
                "--lmbda 0.25 0.5 0.75, are all scored in the same pass. Default: a joint model's own, else 0.25.",
        "nargs": "+"})
    knn_temp: float | None = field(default=None, metadata={
        "help": "Temperature T of softmax(memory_logits / T). Default: a joint model's own, else 1."})
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
        check_finite_floats(self)
        if self.lmbda is not None:
            check_lmbdas(self.lmbda)
        if self.knn_temp is not None and self.knn_temp <= 0:
            raise UsageError(f"--knn_temp must be > 0, got {self.knn_temp}")
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


def joint_nll(batch: ScoredBatch, lm_gold: torch.Tensor, memory: torch.nn.Module, lmbdas: list[float],
              knn_temp: float) -> JointNll:
    """Memory-alone and joint NLL of each row of ``batch``, ``ROWS_PER_SLICE`` rows at a time.

    ``lm_gold`` (n,) is the base's ``log p_lm`` of each row's label (the negated NLL its perplexity sums).
    """
    device = batch.labels.device
    synchronize(device)
    start = time.perf_counter()
    mem_gold = torch.cat([memory_gold_log_probs(memory, batch.hidden[s : s + ROWS_PER_SLICE],
                                                batch.labels[s : s + ROWS_PER_SLICE], knn_temp)
                          for s in range(0, len(batch.rows), ROWS_PER_SLICE)])  # (n,)
    synchronize(device)
    middle = time.perf_counter()
    joint = [-interpolate_log_probs(lm_gold, mem_gold, lmbda) for lmbda in lmbdas]  # each (n,)
    synchronize(device)
    return JointNll(-mem_gold, joint, middle - start, time.perf_counter() - middle)


def evaluate_joint(model_args: PretrainedModelArguments, data_args: DataArguments, args: JointArguments,
                   state: PartialState | None = None, allow_base_mismatch: bool = False) -> dict:
    """Base, memory-alone and joint perplexity (for every lmbda) over the scored rows of one split.

    The memory must belong to the base model (`load_checked_memory`); ``allow_base_mismatch``
    (--allow_base_mismatch) accepts another one, and the results record the check (``base_check``).
    """
    state = state or process_state()
    split = load_split(data_args.dataset_name, resolve_split(data_args, args))
    loaded = load_base_and_memory(model_args, args.knn_generator_path,
                                  lambda: load_model_for_dataset(model_args, split.meta, data_args.dataset_name)[0],
                                  args.lmbda[0] if args.lmbda else None, args.knn_temp,
                                  split.meta["tokenizer"]["fingerprint"], allow_base_mismatch)
    if loaded.memory is None:
        raise UsageError("Give --knn_generator_path (a memory), or a joint model directory as --model_name_or_path")
    if loaded.joint_dir is not None:  # the base inside a joint directory, checked against the dataset as a base is
        check_tokenizer(model_args, split.meta, data_args.dataset_name)
        check_vocab(loaded.model, split.meta, data_args.dataset_name)
    model, memory, layer, base_check = loaded.model, loaded.memory, loaded.layer, loaded.base_check
    args.lmbda, args.knn_temp, args.knn_generator_path = args.lmbda or [loaded.lmbda], loaded.knn_temp, loaded.memory_path
    windows = split.windows[: data_args.max_eval_samples]
    logger.info("Joint model over %d windows of %s: memory %s (%s), lmbda %s, knn_temp %g",
                len(windows), split.split, args.knn_generator_path,
                "a Memory Decoder" if layer is None else f"block {layer}", args.lmbda, args.knn_temp)

    model.to(state.device)
    memory.to(state.device)
    base_totals: dict[int, float] = {}
    memory_totals: dict[int, float] = {}
    joint_totals: list[dict[int, float]] = [{} for _ in args.lmbda]
    base_seconds = memory_seconds = interpolation_seconds = 0.0
    batches = score_batches(model, split.tokens, windows, args.per_device_eval_batch_size, state.process_index,
                            state.num_processes, layer=-1 if layer is None else layer, show_progress=state.is_main_process)
    if is_token_memory(memory):  # its logits over the same windows take the place of the hidden states
        batches, memory = with_token_memory_logits(batches, memory, split.tokens, windows,
                                                   args.per_device_eval_batch_size, state)
    with torch.no_grad():
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            base_nll = token_nll(batch.logits, batch.labels)  # (n,)
            base_totals.update(window_sums(base_nll, batch, windows))
            synchronize(state.device)
            base_seconds += time.perf_counter() - start
            nll = joint_nll(batch, -base_nll, memory, args.lmbda, args.knn_temp)
            memory_seconds += nll.memory_seconds
            interpolation_seconds += nll.interpolation_seconds
            memory_totals.update(window_sums(nll.memory, batch, windows))
            for totals, joint in zip(joint_totals, nll.joint):
                totals.update(window_sums(joint, batch, windows))

    if hasattr(memory, "seconds"):  # a Memory Decoder ran beside the base (with_token_memory_logits): its time
        base_seconds, memory_seconds = base_seconds - memory.seconds, memory_seconds + memory.seconds
    num_rows = int(windows[-1, ROW_END] - windows[0, ROW_BEGIN])

    def loss(totals: dict[int, float], whose: str, cause: str) -> float:
        return check_finite_loss(float(gather_window_totals(totals, len(windows), state).sum() / num_rows), whose, cause)

    memory_cause = (f"its weights may be corrupt (--knn_generator_path {args.knn_generator_path}), or --knn_temp "
                    f"{args.knn_temp} is too small")
    base_loss = loss(base_totals, "The base model's",
                     f"its weights may be corrupt (--model_name_or_path {model_args.model_name_or_path})")
    memory_loss = loss(memory_totals, "The memory's", memory_cause)
    sweep = [{"lmbda": lmbda, "perplexity": math.exp(joint_loss), "eval_loss": joint_loss}
             for lmbda, joint_loss in ((lmbda, loss(t, f"The joint model's (lmbda {lmbda})", memory_cause))
                                       for lmbda, t in zip(args.lmbda, joint_totals))]
    # Base + memory as deployed: one interpolation per token, not the whole sweep.
    joint_seconds = base_seconds + memory_seconds + interpolation_seconds / len(args.lmbda)
    return {
        "eval_subset": split.split, "perplexity": sweep[0]["perplexity"], "eval_loss": sweep[0]["eval_loss"],
        "lmbda": args.lmbda[0], "base_perplexity": math.exp(base_loss), "base_eval_loss": base_loss,
        "memory_perplexity": math.exp(memory_loss), "memory_eval_loss": memory_loss, "lmbda_sweep": sweep,
        "lmbda_choice": lmbda_choice(sweep, split.split), "knn_temp": args.knn_temp, "memory_layer": layer,
        "knn_generator_path": os.path.abspath(args.knn_generator_path), "base_check": base_check,
        "eval_tokens": num_rows, "eval_windows": len(windows), "num_processes": state.num_processes,
        "base_seconds": round(base_seconds, 3), "memory_seconds": round(memory_seconds, 3),
        "interpolation_seconds": round(interpolation_seconds, 3),
        "base_tokens_per_second": round(num_rows / base_seconds, 2),
        "joint_tokens_per_second": round(num_rows / joint_seconds, 2),
    }


def sweep_table(metrics: dict) -> str:
    """The lmbda sweep as a Markdown table, with the base and the memory alone as reference rows."""
    lines = [f"Perplexity on {metrics['eval_subset']} ({metrics['eval_tokens']} tokens, "
             f"knn_temp {metrics['knn_temp']:g})",
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


def save_sweep(output_dir: str, metrics: dict) -> None:
    """``lmbda_sweep.md`` and ``lmbda_sweep.png`` in ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    table = os.path.join(output_dir, "lmbda_sweep.md")
    with open(table + ".partial", "w") as f:
        f.write(sweep_table(metrics))
    os.replace(table + ".partial", table)
    plot_sweep(metrics, os.path.join(output_dir, "lmbda_sweep.png"))
