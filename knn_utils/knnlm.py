"""The kNN-LM baseline: perplexity with live retrieval from the datastore at evaluation time.

    python -m knn_utils.knnlm --model_name_or_path MODEL --dataset_name DATASET --eval_subset validation \
        --dstore_dir DSTORE --k 1024 --lmbda 0.25 --knn_temp 1 --probe 32 --per_device_eval_batch_size 8 \
        --output_dir OUT
    accelerate launch --multi_gpu --num_processes 2 -m knn_utils.knnlm ...   # same numbers, any process count

(On a machine without CUDA, ``--multi_gpu`` starts N CPU processes that talk over gloo;
``accelerate launch --cpu`` starts only one.)

For every scored row the query is the hooked key of the frozen LM (the same hidden state the datastore
holds), ``p_knn`` comes from the values of its ``k`` nearest rows weighted by ``softmax(-d / knn_temp)``
(nearest by exact distance, ties to the lower row, as for the kNN targets: `knn_utils.index_search.KnnIndex.search`),
and ``log p = logaddexp(log p_lm + log(1 - lmbda), log p_knn + log lmbda)``. Perplexity needs only the
gold token: ``p_knn(gold)`` is the summed weight of the neighbours whose value is the gold token
(`knn_gold_log_probs`), and ``log p_lm(gold)`` the one the base perplexity uses, so no (rows x vocab)
``p_knn`` or interpolation is built (`knnlm_log_probs` keeps the full distribution). The base perplexity
comes from the same pass; both go to ``OUT/knnlm_results.json``. When the evaluated split is the one the
datastore was built from, each row's own datastore entry is left out.

The keys belong to the base model that made them: the evaluated model's fingerprint
(`utils.modeling.model_fingerprint` at the datastore's layer) must be the one the datastore records, as for
every memory consumer; ``--allow_base_mismatch`` accepts another and the results record it (``base_check``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import PartialState

from knn_utils.faiss_devices import configure_threads
from knn_utils.index_search import KNN_GPU_HELP, KnnIndex, check_gpu_k, load_index
from models.joint.interpolation import check_lmbdas, interpolate_log_probs
from models.joint.settings import DEFAULT_LMBDA, PERPLEXITY
from utils.arguments import BaseCheckArguments, DataArguments, PretrainedModelArguments
from utils.artifacts.dataset import TokenizedSplit, load_split
from utils.artifacts.datastore import Datastore, open_datastore
from utils.artifacts.index import default_index_path
from utils.cli import UsageError, check_finite_floats, command, parse_args, setup_logging
from utils.distributed import process_state
from utils.io import save_metrics
from utils.locking import artifact_lock
from utils.modeling import check_model_fingerprint, load_model_for_dataset, model_fingerprint
from utils.scoring import ScoredBatch, check_finite_loss, gather_window_totals, score_batches, token_nll, window_sums
from utils.windows import ROW_BEGIN, ROW_END

logger = logging.getLogger(__name__)

@dataclass
class KnnLMArguments:
    """The datastore, the index and the kNN-LM settings."""

    dstore_dir: str = field(metadata={"help": "Datastore directory (train_base --save_knnlm_dstore)."})
    output_dir: str = field(metadata={"help": "Directory for knnlm_results.json (merged into all_results.json)."})
    index_path: str | None = field(default=None, metadata={"help": "Index directory (default: DSTORE_DIR/index)."})
    k: int = field(default=1024, metadata={"help": "Neighbours retrieved per token."})
    lmbda: list[float] = field(default_factory=lambda: [DEFAULT_LMBDA[PERPLEXITY]], metadata={
        "help": "Weight of p_knn in the interpolation (0: the base LM alone). Several values, e.g. --lmbda 0.1 0.25 "
                "0.4, are all scored in the same pass (one search); the first is the headline.", "nargs": "+"})
    knn_temp: float = field(default=1.0, metadata={
        "help": "Temperature T of the kNN distribution, softmax(-d / T) over squared L2 distances (not the memory's "
                "logit temperature, --memory_temp of evaluate_joint)."})
    probe: int | None = field(default=None, metadata={"help": "IVF lists visited per query (default: the index's own)."})
    knn_gpu: bool = field(default=False, metadata={"help": KNN_GPU_HELP})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Windows per forward pass and process."})

    def __post_init__(self):
        check_finite_floats(self)
        if self.k < 1:
            raise UsageError(f"--k must be >= 1, got {self.k}")
        if isinstance(self.lmbda, (int, float)):  # one value, from Python
            self.lmbda = [float(self.lmbda)]
        check_lmbdas(self.lmbda)
        if self.knn_temp <= 0:
            raise UsageError(f"--knn_temp must be > 0, got {self.knn_temp}")
        if self.per_device_eval_batch_size < 1:
            raise UsageError(f"--per_device_eval_batch_size must be >= 1, got {self.per_device_eval_batch_size}")


# ---------------------------------------------------------------------------------------------------
# p_knn from the neighbours, interpolated with the LM by models.joint's formula


def neighbour_weights(dists: torch.Tensor, knn_temp: float) -> torch.Tensor:
    """``softmax(-d / knn_temp)`` over each row's neighbours in float32, (n, k) -> (n, k); 0 where d = inf."""
    logits = -dists.float() / knn_temp  # (n, k)
    top = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - torch.where(torch.isfinite(top), top, 0.0))  # (n, k), 0 where d = inf
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def knn_log_probs(dists: torch.Tensor, neighbour_vals: torch.Tensor, vocab_size: int, knn_temp: float) -> torch.Tensor:
    """``log p_knn`` over the vocabulary, (n, k), (n, k) -> (n, V).

    Each neighbour weighs ``softmax(-d / knn_temp)``; weights of equal tokens add up. Tokens no
    neighbour holds get ``-inf``. A neighbour with distance ``inf`` (none found) weighs 0.
    """
    probs = torch.zeros(len(dists), vocab_size, dtype=torch.float32, device=dists.device)
    probs.scatter_add_(1, neighbour_vals.long().clamp_min(0), neighbour_weights(dists, knn_temp))  # (n, V)
    return probs.log()


def knn_gold_log_probs(dists: torch.Tensor, neighbour_vals: torch.Tensor, labels: torch.Tensor,
                       knn_temp: float) -> torch.Tensor:
    """``knn_log_probs(...)[label]`` of each row from its ``k`` neighbours alone, (n, k), (n, k), (n,) -> (n,):
    the log of the summed weight of the neighbours whose value is the label (``-inf`` when none is)."""
    holds_gold = neighbour_vals.long() == labels[:, None].long()  # (n, k)
    return (neighbour_weights(dists, knn_temp) * holds_gold).sum(dim=-1).log()


def knnlm_log_probs(lm_logits: torch.Tensor, dists: torch.Tensor, neighbour_vals: torch.Tensor, lmbda: float,
                    knn_temp: float) -> torch.Tensor:
    """kNN-LM log-probabilities over the full vocabulary, (n, V).

    ``lm_logits`` (n, V); ``dists`` (n, k) squared L2 distances, ``inf`` for missing neighbours;
    ``neighbour_vals`` (n, k) their value tokens. A row with no neighbour at all keeps ``log p_lm``.
    """
    return knnlm_log_probs_sweep(lm_logits, dists, neighbour_vals, [lmbda], knn_temp)[0]


def knnlm_log_probs_sweep(lm_logits: torch.Tensor, dists: torch.Tensor, neighbour_vals: torch.Tensor,
                          lmbdas: list[float], knn_temp: float) -> list[torch.Tensor]:
    """`knnlm_log_probs` for each of ``lmbdas``, from one ``log p_lm`` and one ``log p_knn``: a list of (n, V)."""
    lm_log_probs = torch.log_softmax(lm_logits.float(), dim=-1)  # (n, V)
    knn = knn_log_probs(dists, neighbour_vals, lm_logits.shape[-1], knn_temp)  # (n, V)
    has_neighbours = torch.isfinite(dists).any(dim=-1, keepdim=True)  # (n, 1)
    return [torch.where(has_neighbours, interpolate_log_probs(lm_log_probs, knn, lmbda), lm_log_probs)
            for lmbda in lmbdas]


def knnlm_gold_log_probs_sweep(lm_gold: torch.Tensor, dists: torch.Tensor, neighbour_vals: torch.Tensor,
                               labels: torch.Tensor, lmbdas: list[float], knn_temp: float) -> torch.Tensor:
    """`knnlm_log_probs_sweep`'s entries at the labels, (len(lmbdas), n), from ``lm_gold`` (n,) = ``log p_lm`` of
    each label and the ``k`` neighbours: no (n, V) tensor."""
    knn_gold = knn_gold_log_probs(dists, neighbour_vals, labels, knn_temp)  # (n,)
    has_neighbours = torch.isfinite(dists).any(dim=-1)  # (n,)
    return torch.stack([torch.where(has_neighbours, interpolate_log_probs(lm_gold, knn_gold, lmbda), lm_gold)
                        for lmbda in lmbdas])


# ---------------------------------------------------------------------------------------------------
# Evaluation


def check_datastore_fits(datastore: Datastore, split: TokenizedSplit, model, model_args: PretrainedModelArguments,
                         allow_base_mismatch: bool = False) -> dict:
    """The datastore must hold keys of this model's architecture and width, over ids of this tokenizer, made by this
    model's weights (its fingerprint, unless ``allow_base_mismatch``); returns the record of that check."""
    meta, where = datastore.meta, f"--dstore_dir {datastore.path}"
    if meta.get("tokenizer_fingerprint") != split.meta["tokenizer"]["fingerprint"]:
        raise UsageError(f"{where} was built with tokenizer fingerprint {meta.get('tokenizer_fingerprint')}, but the "
                         f"evaluated dataset was tokenized with {split.meta['tokenizer']['fingerprint']}")
    if meta.get("architecture") != model.config.model_type:
        raise UsageError(f"{where} holds keys of a {meta.get('architecture')} model, the evaluated model is {model.config.model_type}")
    if datastore.dim != model.config.hidden_size:
        raise UsageError(f"{where} holds keys of dimension {datastore.dim}, the model's hidden size is {model.config.hidden_size}")
    return check_model_fingerprint(model_fingerprint(model, meta["layer"]), meta.get("model_fingerprint"),
                                   f"{where} (the keys of a base model)",
                                   f"--model_name_or_path {model_args.model_name_or_path}", allow_base_mismatch)


def same_rows(datastore: Datastore, split: TokenizedSplit) -> bool:
    """Whether the evaluated split is the datastore's own token stream (row r is datastore row r)."""
    return datastore.meta["dataset"]["tokens_sha256"] == split.meta["splits"][split.split]["tokens_sha256"]


def knnlm_nll(batch: ScoredBatch, lm_gold: torch.Tensor, index: KnnIndex, vals: np.ndarray, args: KnnLMArguments,
              exclude_self: bool) -> torch.Tensor:
    """Negative log-likelihood of each row's label under the kNN-LM at each ``--lmbda``, (len(lmbda), n).

    ``lm_gold`` (n,) is the base's ``log p_lm`` of each label (the negated NLL its perplexity sums).
    """
    neighbours = index.search(batch.hidden.float().cpu().numpy(), args.k, batch.rows if exclude_self else None)
    device = batch.labels.device
    dists = torch.from_numpy(neighbours.dists).to(device)  # (n, k)
    neighbour_vals = torch.from_numpy(np.asarray(vals[np.where(neighbours.valid, neighbours.ids, 0)], dtype=np.int64)).to(device)
    return -knnlm_gold_log_probs_sweep(lm_gold, dists, neighbour_vals, batch.labels, args.lmbda, args.knn_temp)


def evaluate_knnlm(model_args: PretrainedModelArguments, data_args: DataArguments, args: KnnLMArguments,
                   state: PartialState | None = None, checks: BaseCheckArguments | None = None) -> dict:
    """kNN-LM and base perplexity over the scored rows of ``data_args.eval_subset``; returns the metrics."""
    state = state or process_state()
    checks = checks or BaseCheckArguments()
    verify = state.is_local_main_process  # each machine verifies its files once; the others wait below
    split = load_split(data_args.dataset_name, data_args.eval_subset, verify, checks.allow_unverified)
    datastore = open_datastore(args.dstore_dir, "--dstore_dir", verify, checks.allow_unverified)
    model, _ = load_model_for_dataset(model_args, split.meta, data_args.dataset_name)
    base_check = check_datastore_fits(datastore, split, model, model_args, checks.allow_base_mismatch)
    check_gpu_k(args.k, args.knn_gpu)
    index = load_index(args.index_path or default_index_path(args.dstore_dir), datastore, args.probe, args.knn_gpu,
                       verify=verify, allow_unverified=checks.allow_unverified)
    state.wait_for_everyone()
    threads = configure_threads(state.num_processes)
    exclude_self = same_rows(datastore, split)
    if exclude_self:
        logger.info("The evaluated split is the datastore's own: each row's own entry is left out of its neighbours")
    windows = split.windows[: data_args.max_eval_samples]
    logger.info("kNN-LM over %d windows of %s: k=%d lmbda=%s knn_temp=%g, %s index (nprobe %s), %d FAISS threads",
                len(windows), split.split, args.k, args.lmbda, args.knn_temp, index.meta["index_type"], index.nprobe, threads)

    model.to(state.device)
    base_totals: dict[int, float] = {}
    knn_totals: list[dict[int, float]] = [{} for _ in args.lmbda]
    knn_seconds, start = 0.0, time.perf_counter()
    for batch in score_batches(model, split.tokens, windows, args.per_device_eval_batch_size, state.process_index,
                               state.num_processes, layer=datastore.meta["layer"], show_progress=state.is_main_process):
        base_nll = token_nll(batch.logits, batch.labels)  # (n,)
        base_totals.update(window_sums(base_nll, batch, windows))
        knn_start = time.perf_counter()
        for totals, nll in zip(knn_totals, knnlm_nll(batch, -base_nll, index, datastore.vals, args, exclude_self)):
            totals.update(window_sums(nll, batch, windows))
        knn_seconds += time.perf_counter() - knn_start
    index.finish()  # a sharded index searched by several processes: answer theirs until all are done
    seconds = time.perf_counter() - start
    num_rows = int(windows[-1, ROW_END] - windows[0, ROW_BEGIN])
    base_loss = check_finite_loss(float(gather_window_totals(base_totals, len(windows), state).sum() / num_rows),
                                  "The base model's", f"its weights may be corrupt (--model_name_or_path "
                                  f"{model_args.model_name_or_path})")
    losses = [check_finite_loss(float(gather_window_totals(totals, len(windows), state).sum() / num_rows),
                                f"The kNN-LM's (lmbda {lmbda})", f"the datastore's keys may be corrupt (--dstore_dir "
                                f"{args.dstore_dir}), or --knn_temp {args.knn_temp} is too small")
              for lmbda, totals in zip(args.lmbda, knn_totals)]
    sweep = [{"lmbda": lmbda, "perplexity": math.exp(loss), "eval_loss": loss}
             for lmbda, loss in zip(args.lmbda, losses)]
    return {
        "eval_subset": split.split, "perplexity": sweep[0]["perplexity"], "eval_loss": losses[0], "lmbda_sweep": sweep,
        "base_perplexity": math.exp(base_loss), "base_eval_loss": base_loss, "eval_tokens": num_rows,
        "eval_windows": len(windows), "k": args.k, "lmbda": args.lmbda[0], "knn_temp": args.knn_temp,
        "probe": index.nprobe, "index_type": index.meta["index_type"], "dstore_rows": datastore.num_rows,
        "exclude_self": exclude_self, "num_processes": state.num_processes, "eval_seconds": round(seconds, 3),
        "knn_seconds": round(knn_seconds, 3), "eval_tokens_per_second": round(num_rows / seconds, 2),
        "base_check": base_check,
    }


def main(argv: list[str] | None = None) -> dict:

    state = process_state()
    setup_logging(state.is_main_process)
    model_args, data_args, args, checks = parse_args(
        (PretrainedModelArguments, DataArguments, KnnLMArguments, BaseCheckArguments), argv)
    logger.info("Arguments: %s %s %s %s", model_args, data_args, args, checks)
    with artifact_lock(args.output_dir, "--output_dir", state):
        metrics = evaluate_knnlm(model_args, data_args, args, state, checks)
        if state.is_main_process:
            save_metrics(args.output_dir, "knnlm", metrics)
    if state.is_main_process:
        logger.info("Perplexity on %s: kNN-LM %.4f, base %.4f over %d tokens (%.1f tokens/s)", metrics["eval_subset"],
                    metrics["perplexity"], metrics["base_perplexity"], metrics["eval_tokens"], metrics["eval_tokens_per_second"])
    return metrics


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
