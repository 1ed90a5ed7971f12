"""The two modes' set-up (the entry points only parse and call these): `run_offline` (datastore keys ->
kNN targets) and `run_online` (hidden states of the frozen base model -> kNN targets), with what they
share: building the memory (`make_memory`), the `Accelerator`, the kNN targets and the seed."""

from __future__ import annotations

import logging
import os

import torch

from models import MemoryConfig, MLPMemoryPreTrainedModel, build_memory, init_lm_head_from_base
from models.training.arguments import (MemoryArguments, MemoryTrainingArguments, OfflineArguments, OnlineArguments,
                                       result_settings)
from models.training.checkpoints import prepare_output_dir
from models.training.loop import train_memory
from models.training.rows import DatastoreRows, OnTheFlyRows, rows_of_windows
from utils.artifacts.datastore import Datastore
from utils.artifacts.knn_targets import (KnnTargets, check_fingerprint, check_labels, check_targets_for_datastore,
                                         load_knn_targets, targets_summary)
from utils.cli import UsageError, setup_logging
from utils.io import timed
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The memory


def make_memory(memory_args: MemoryArguments, base_config, base_parameters: int | None, record: dict,
                base_model: torch.nn.Module | None = None) -> MLPMemoryPreTrainedModel:
    """Build (and optionally head-initialise) a memory for a base model; ``record`` = base_model, layer,
    tokenizer_fingerprint, base_model_fingerprint."""
    config = MemoryConfig.from_base(base_config, preset=memory_args.base_model_name, num_layers=memory_args.num_layers,
                                    intermediate_size=memory_args.intermediate_size, base_parameters=base_parameters,
                                    **record)
    if memory_args.memory_dropout is not None:
        config.dropout = memory_args.memory_dropout
    memory = build_memory(config)
    logger.info("Memory: %s", config.describe())
    if base_parameters:
        logger.info("Base model: %.2fM parameters; memory: %.2fM", base_parameters / 1e6, memory.num_parameters() / 1e6)
    if memory_args.init_lm_head:
        if base_model is None:
            raise UsageError("--init_lm_head needs the base model's weights (give --model_name_or_path)")
        init_lm_head_from_base(memory, base_model)
    return memory


def base_parameter_count(config) -> int:
    """Parameters of a causal LM of this config, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).num_parameters()


# ---------------------------------------------------------------------------------------------------
# Accelerator


def make_accelerator(args: MemoryTrainingArguments):
    """An `Accelerator`: gloo processes on a machine without CUDA, bf16 autocast on GPU only."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and args.bf16 else "no")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # our own lines time the checkpoints
    if accelerator.num_processes > 1 and not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.state.num_processes))
    return accelerator


# ---------------------------------------------------------------------------------------------------
# The two modes: their inputs, checks and set-up


def open_targets(args: MemoryTrainingArguments, verify: bool, allow_unverified: bool = False) -> KnnTargets:
    with timed("Opening the kNN targets", logger):
        return load_knn_targets(args.knn_save_path, verify, allow_unverified)


def offline_base(args: OfflineArguments, datastore: Datastore):
    """The base model's ModelArguments and config (and its tokenizer checked) for an offline memory."""
    from transformers import AutoConfig

    from utils.arguments import ModelArguments
    from utils.modeling import check_exists, load_tokenizer, loading, tokenizer_fingerprint

    recorded = datastore.meta.get("model") or {}
    if args.model_name_or_path is None and not recorded.get("model_name_or_path"):
        raise UsageError(f"--knn_dstore_path {datastore.path} does not record a loadable base model; give --model_name_or_path")
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path or recorded["model_name_or_path"],
                                gguf_file=None if args.model_name_or_path else recorded.get("gguf_file"))
    flag = "--model_name_or_path" if args.model_name_or_path else f"the base model recorded in {datastore.path}/meta.json"
    check_exists(model_args.model_name_or_path, flag)
    kwargs = {"gguf_file": model_args.gguf_file} if model_args.gguf_file else {}
    with loading(model_args.model_name_or_path, flag):
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **kwargs)
    if config.hidden_size != datastore.dim:
        raise UsageError(f"{flag} {model_args.model_name_or_path} has hidden size {config.hidden_size}, but the keys of "
                         f"--knn_dstore_path {datastore.path} have dimension {datastore.dim}")
    if args.model_name_or_path is not None:
        try:
            fingerprint = tokenizer_fingerprint(load_tokenizer(model_args.model_name_or_path, model_args.gguf_file, flag))
        except (OSError, ValueError):
            fingerprint = None
            logger.warning("No tokenizer beside %s; its fingerprint is not checked", model_args.model_name_or_path)
        if fingerprint and fingerprint != datastore.meta.get("tokenizer_fingerprint"):
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path} has tokenizer fingerprint {fingerprint}, "
                             f"but --knn_dstore_path {datastore.path} was made with {datastore.meta.get('tokenizer_fingerprint')}")
    return model_args, config


def run_offline(offline: OfflineArguments, memory_args: MemoryArguments, args: MemoryTrainingArguments,
                stop_after_steps: int | None = None, allow_base_mismatch: bool = False,
                allow_unverified: bool = False) -> dict | None:
    """Train a memory on datastore keys -> kNN targets, holding the lock of --output_dir.

    The memory belongs to the model whose hidden states the keys are: it records the datastore's
    model fingerprint. A base model that is loaded (--model_name_or_path, or --init_lm_head) must be
    that model unless ``allow_base_mismatch``. The targets may come from another retriever over the
    same rows (recorded in meta.json: ``knn_targets.retriever``). The inputs (datastore, targets, base
    model) are checked before --output_dir is created; inputs without block checksums are refused unless
    ``allow_unverified``.
    """
    from utils.artifacts.datastore import datastore_summary, open_datastore
    from utils.modeling import check_model_fingerprint, describe_model, load_causal_lm, model_fingerprint

    accelerator = make_accelerator(args)
    setup_logging(accelerator.is_main_process)
    logger.info("Offline memory training: %s %s %s", offline, memory_args, args)
    with artifact_lock(args.output_dir, "--output_dir", accelerator):
        verify = accelerator.is_local_main_process  # each machine verifies the files once; the others wait for it
        datastore = open_datastore(offline.knn_dstore_path, "--knn_dstore_path", verify, allow_unverified)
        targets = open_targets(args, verify, allow_unverified)
        accelerator.wait_for_everyone()
        check_targets_for_datastore(targets, datastore)
        model_args, base_config = offline_base(offline, datastore)
        keys_fingerprint = datastore.meta.get("model_fingerprint")
        base_model, checks = None, {}
        if memory_args.init_lm_head or offline.model_name_or_path:
            with timed("Loading the base model", logger):
                base_model = load_causal_lm(model_args)
            what = f"--model_name_or_path {offline.model_name_or_path}" if offline.model_name_or_path else \
                f"the base model {model_args.model_name_or_path}"
            layer = datastore.meta.get("layer")
            checks["base_check"] = check_model_fingerprint(
                model_fingerprint(base_model, -1 if layer is None else layer), keys_fingerprint,
                f"--knn_dstore_path {datastore.path} (the hidden states of a base model)", what, allow_base_mismatch)
        prepare_output_dir(args, accelerator)
        record = {"base_model": describe_model(model_args), "layer": datastore.meta.get("layer"),
                  "tokenizer_fingerprint": datastore.meta.get("tokenizer_fingerprint"),
                  "base_model_fingerprint": keys_fingerprint}
        set_seed(args.seed)
        memory = make_memory(memory_args, base_config, base_parameter_count(base_config), record, base_model)
        del base_model
        boundary = datastore.num_rows - args.held_out_rows(datastore.num_rows)
        source = DatastoreRows(datastore, targets, boundary, memory.config.vocab_size,
                               offline.per_device_train_batch_size, offline.per_device_eval_batch_size,
                               offline.max_train_samples, offline.dataloader_num_workers)
        provenance = {"mode": "offline", **record, "datastore": datastore_summary(datastore),
                      "knn_targets": targets_summary(targets)}
        return train_memory(memory, source, args, accelerator, provenance, stop_after_steps,
                            result_settings(offline, memory_args, args), checks)


def run_online(online: OnlineArguments, model_args, memory_args: MemoryArguments, args: MemoryTrainingArguments,
               stop_after_steps: int | None = None, allow_base_mismatch: bool = False,
               allow_unverified: bool = False) -> dict | None:
    """Train a memory on hidden states computed by the frozen base model -> kNN targets, holding the lock of
    --output_dir.

    The memory records the base model's fingerprint. The targets must describe that model's datastore
    rows (their fingerprint) unless ``allow_base_mismatch`` (targets of another retriever's keys). The inputs
    (dataset, targets, base model) are checked before --output_dir is created; inputs without block checksums are
    refused unless ``allow_unverified``.
    """
    from utils.architectures import normalize_layer
    from utils.artifacts.dataset import load_split
    from utils.modeling import check_model_fingerprint, describe_model, load_model_for_dataset, model_fingerprint

    accelerator = make_accelerator(args)
    setup_logging(accelerator.is_main_process)
    logger.info("Online memory training: %s %s %s %s", online, model_args, memory_args, args)
    with artifact_lock(args.output_dir, "--output_dir", accelerator):
        verify = accelerator.is_local_main_process  # each machine verifies the files once; the others wait for it
        split = load_split(online.dataset_name, online.dataset_split_name, verify, allow_unverified)
        targets = open_targets(args, verify, allow_unverified)
        accelerator.wait_for_everyone()
        fingerprint = split.meta["tokenizer"]["fingerprint"]
        what = f"--dataset_name {online.dataset_name} ({online.dataset_split_name})"
        check_fingerprint(targets, fingerprint, f"--dataset_name {online.dataset_name}")
        num_windows = rows_of_windows(split.windows, targets.num_rows, what)
        check_labels(targets, split.tokens[1 : targets.num_rows + 1], what)
        with timed("Loading the base model", logger):
            base_model, _ = load_model_for_dataset(model_args, split.meta, online.dataset_name)
        base_model.requires_grad_(False).eval().to(accelerator.device)
        layer = normalize_layer(base_model, online.dstore_layer)
        base_fingerprint = model_fingerprint(base_model, layer)
        checks = {"base_check": check_model_fingerprint(
            base_fingerprint, targets.meta.get("queries", {}).get("model_fingerprint"),
            f"--knn_save_path {targets.path} (kNN targets of the datastore keys of a base model)",
            f"--model_name_or_path {model_args.model_name_or_path}", allow_base_mismatch)}
        prepare_output_dir(args, accelerator)
        record = {"base_model": describe_model(model_args), "layer": layer, "tokenizer_fingerprint": fingerprint,
                  "base_model_fingerprint": base_fingerprint}
        set_seed(args.seed)
        memory = make_memory(memory_args, base_model.config, base_model.num_parameters(), record, base_model)
        boundary = targets.num_rows - args.held_out_rows(targets.num_rows)
        source = OnTheFlyRows(base_model, split.tokens, split.windows[:num_windows], layer, targets, boundary,
                              memory.config.vocab_size, online.per_device_train_batch_size,
                              online.per_device_eval_batch_size, online.max_train_samples)
        dataset = {"path": os.path.abspath(online.dataset_name), "split": online.dataset_split_name,
                   "tokens_sha256": split.meta["splits"][online.dataset_split_name]["tokens_sha256"],
                   "block_size": split.meta["block_size"], "stride": split.meta["stride"]}
        provenance = {"mode": "online", **record, "dataset": dataset, "knn_targets": targets_summary(targets)}
        return train_memory(memory, source, args, accelerator, provenance, stop_after_steps,
                            result_settings(online, model_args, memory_args, args), checks)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (the memory's initialisation and dropout)."""
    from accelerate.utils import set_seed as accelerate_set_seed

    accelerate_set_seed(seed)
