"""Loading base models and tokenizers: hub names, local directories, GGUF files, tiny from-scratch configs."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from utils.architectures import arch_spec, submodule, transformer_blocks
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError
from utils.io import ArtifactError, read_meta_file, timed

logger = logging.getLogger(__name__)


def looks_local(path: str) -> bool:
    """Whether ``path`` can only be meant as a local path: hub names are ``name`` or ``org/name``.

    ``./x``, ``/x``, ``~/x``, ``a/b/c``, and ``a/b`` when ``a`` is a local directory (``outputs/base`` beside
    an ``outputs/`` folder) are local.
    """
    parts = path.split("/")
    return path.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_exists(path: str | None, flag: str) -> None:
    """Raise a clear error if ``path`` is written as a local path (not a hub name) but does not exist."""
    if path and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise UsageError(f"{flag} {path}: no such file or directory")


def local_path_or_name(path: str | None) -> str | None:
    """``path`` made absolute when it is a local file or directory (so that a stage run from another directory
    finds it through a meta.json); a hub name is returned as it is."""
    if path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


def weight_files(path: str) -> str:
    """The safetensors files of a model directory, for error messages."""
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return ", ".join(found) if found else os.path.join(path, "model.safetensors")


@contextmanager
def loading(path: str, flag: str) -> Iterator[None]:
    """Turn the errors of loading a model from ``path`` into errors that name ``flag``, ``path`` and the file at fault:
    a corrupt or truncated safetensors file, or a pickle that ``weights_only`` loading refuses, is an
    `ArtifactError`; a path that is neither a local model directory nor a hub model (``OSError``, ``ValueError`` from
    transformers) a `UsageError`. A local directory's config.json is checked first (`check_config_sizes`): nothing is
    built from sizes no machine can hold."""
    try:
        if os.path.isfile(os.path.join(path, "config.json")):
            check_config_sizes(os.path.join(path, "config.json"), flag)
        yield
    except UsageError:  # already a clear error (a UsageError is a ValueError)
        raise
    except SafetensorError as err:
        raise ArtifactError(f"{flag} {path}: cannot read the weights in {weight_files(path)}: the file is truncated or "
                            f"corrupt ({err})") from None
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met more than tensors, or no pickle at all
        pickled = ", ".join(sorted(glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))))
        raise ArtifactError(f"{flag} {path}: {pickled or 'its weight file'} is a pickle that does not hold plain tensors "
                            f"(or is corrupt), and is never loaded: loading it could run code "
                            f"({str(err).splitlines()[0][:80]}). Save the model as safetensors.") from None
    except (OSError, ValueError) as err:
        where = "a local directory without a loadable model" if os.path.isdir(path) else "not a local directory, and not a hub model"
        raise UsageError(f"{flag} {path}: {where} ({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------------
# Sizes in a config.json, checked before anything is built from them

MAX_LAYERS = 4096  # deeper than any published model or memory (GPT2-large's memory: 54 blocks)
SIZE_FIELDS = {  # what each size is called across architectures (the memory's names included)
    "width": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "ffn": ("intermediate_size", "n_inner"),
    "vocab": ("vocab_size",),
    "positions": ("max_position_embeddings", "n_positions"),
}


def physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def config_parameters(config: dict, where: str) -> int:
    """A lower bound on the parameters of a model (and of every model nested in it: a joint model's base and memory)
    described by a config.json's ``config``; a size that is not a whole number >= 0, or a depth over `MAX_LAYERS`, is
    an `ArtifactError` naming ``where`` and the field."""
    sizes = {}
    for what, names in SIZE_FIELDS.items():
        for name in names:
            value = config.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ArtifactError(f"{where}: {name} is {value!r}, not a whole number >= 0")
            sizes.setdefault(what, (name, value))
    if "layers" in sizes and sizes["layers"][1] > MAX_LAYERS:
        raise ArtifactError(f"{where}: {sizes['layers'][0]} is {sizes['layers'][1]:,}, more blocks than any model has "
                            f"(at most {MAX_LAYERS:,} are built): refusing to build it (was the config edited?)")
    width, layers, vocab, positions = (sizes.get(what, (None, 0))[1] for what in ("width", "layers", "vocab", "positions"))
    ffn = sizes.get("ffn", (None, None))[1] or 4 * width
    parts = [config_parameters(value, f"{where} ({key})") for key, value in config.items()
             if isinstance(value, dict) and "model_type" in value]
    if parts:  # a composite (a joint model): its own sizes repeat its parts'
        return sum(parts)
    return vocab * width + positions * width + layers * (4 * width * width + 2 * width * ffn)


def check_config_sizes(config_file: str | os.PathLike, flag: str) -> None:
    """Refuse a config.json whose sizes no machine could build (an edited vocabulary or width allocating exabytes, a
    million blocks taking hours to construct) before transformers builds anything: an `ArtifactError` naming the file,
    the field, and the memory it would take. Lower bound: 2 bytes a parameter, embeddings counted once."""
    check_sizes(read_meta_file(Path(config_file), "a model's JSON configuration"), f"{flag} {config_file}")


def check_sizes(config: dict, where: str) -> None:
    """`check_config_sizes` of a config as a dict (``where`` names its origin in the error)."""
    needed = 2 * config_parameters(config, where)
    memory = physical_memory_bytes()
    if memory is not None and needed > memory:
        fields = [f"{name} {config[name]:,}" for names in SIZE_FIELDS.values() for name in names
                  if isinstance(config.get(name), int) and not isinstance(config.get(name), bool)]
        raise ArtifactError(f"{where}: its sizes ({', '.join(fields) or 'of its sub-models'}) make a model of at least "
                            f"{needed / 1e9:,.1f} GB, more than this machine's {memory / 1e9:,.1f} GB of memory: "
                            "refusing to build it (was the config edited?)")


def load_tokenizer(path: str, gguf_file: str | None = None, flag: str = "--tokenizer_path") -> PreTrainedTokenizerBase:
    """A tokenizer from a directory, a hub name or a GGUF file; errors name ``flag``."""
    check_exists(path, flag)
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)) and os.path.isdir(path):
        raise UsageError(f"--gguf_file {gguf_file}: not found in {path}")
    if gguf_file is None and is_bare_bpe_dir(path):
        tokenizer = GPT2TokenizerFast.from_pretrained(path)
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        # Not a local directory and not loadable from the hub: a usage error. A local directory without tokenizer
        # files raises OSError as before (`check_tokenizer` falls back to checking the vocabulary size then).
        with nullcontext() if os.path.isdir(path) else loading(path, flag):
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if len(tokenizer) < 2:
        raise UsageError(f"{flag} {path}: the tokenizer loaded with an empty vocabulary")
    return tokenizer


def is_bare_bpe_dir(path: str) -> bool:
    """A directory with only GPT-2 style ``vocab.json`` + ``merges.txt`` (no tokenizer config to auto-load)."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has("vocab.json") and has("merges.txt") and not has("tokenizer_config.json") and not has("tokenizer.json")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id map, to tell tokenizers apart whatever their file layout."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Which base model: a fingerprint of what determines the kNN keys


def model_fingerprint(model: torch.nn.Module, layer: int) -> str:
    """A short hash of everything that determines the keys of block ``layer`` (its feed-forward input).

    Hashed: the architecture fields of the config (not names, versions, dtypes, special token ids or
    output switches, which a saved copy or another loader may change), then the name, shape and values
    of every parameter except the blocks after ``layer``, the final norm and an untied LM head, one
    tensor at a time (a SHA-256 per tensor, in threads, then one over them all). Values are rounded to
    bfloat16 first, so the model loaded in float32 or bfloat16 has the same fingerprint; loaded in
    float16 it differs. Another seed, a fine-tuned copy or a GGUF of another quantization all differ.
    Cost: 0.3 s for SmolLM2-135M's 134.5M hashed parameters on 2 busy CPU cores. The result is cached
    on the model until a hashed parameter is replaced or changed in place (its version counter moves).
    """
    num_blocks = len(transformer_blocks(model))
    if not -num_blocks <= layer < num_blocks:
        raise UsageError(f"Block {layer} is out of range for a base model with {num_blocks} blocks")
    layer %= num_blocks
    params = fingerprinted_parameters(model, layer)
    version = (layer, tuple((p.data_ptr(), p._version) for _, p in params))
    cached = getattr(model, "_fingerprint_cache", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    with timed(f"Fingerprinting the base model (blocks 0-{layer}, {sum(p.numel() for _, p in params) / 1e6:.1f}M "
               "parameters)", logger):
        config = {k: v for k, v in model.config.to_dict().items()
                  if not k.startswith("_") and k not in NOT_ARCHITECTURE_FIELDS}
        digest = hashlib.sha256(json.dumps([config, layer], sort_keys=True, default=str).encode())
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib and torch release the GIL
            for tensor_digest in pool.map(lambda item: parameter_digest(*item), params):
                digest.update(tensor_digest)
    fingerprint = digest.hexdigest()[:16]
    model._fingerprint_cache = (version, fingerprint)
    return fingerprint


def parameter_digest(name: str, param: torch.Tensor) -> bytes:
    """SHA-256 of a parameter's name, shape and values rounded to bfloat16."""
    values = param.detach().to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
    digest = hashlib.sha256(f"{name} {tuple(param.shape)}".encode())
    digest.update(memoryview(values))
    return digest.digest()


# Config fields that do not change what the blocks compute; `model_fingerprint` leaves them out (with every
# field whose name starts with "_").
NOT_ARCHITECTURE_FIELDS = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "quantization_config", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "decoder_start_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "task_specific_params",
})


def fingerprinted_parameters(model: torch.nn.Module, layer: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the keys of block ``layer`` depend on: all but later blocks, the final norm and an untied head."""
    spec = arch_spec(model.config.model_type)
    head = model.get_output_embeddings()
    skipped = {id(p) for i, block in enumerate(transformer_blocks(model)) if i > layer for p in block.parameters()}
    skipped |= {id(p) for p in submodule(model, spec.final_norm).parameters()}
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        skipped |= {id(p) for p in head.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) not in skipped]


_WARNED: set = set()  # what check_model_fingerprint has already warned about (once per process)


def check_model_fingerprint(actual: str, recorded: str | None, subject: str, model: str,
                            allow_base_mismatch: bool = False, unrecorded: str | None = None) -> dict:
    """Compare a base model's `model_fingerprint` with the one recorded by ``subject`` (a memory, a datastore ...).

    A mismatch is a `UsageError` unless ``allow_base_mismatch`` (--allow_base_mismatch), then a warning.
    An artifact without a recorded fingerprint (``recorded`` None) is accepted with one warning, which says
    why it has none: ``unrecorded``, by default that it was made before fingerprints were recorded.
    Returns what results and meta.json record about the check.
    """
    record = {"model_fingerprint": actual, "recorded_fingerprint": recorded,
              "matches": None if recorded is None else actual == recorded, "allow_base_mismatch": allow_base_mismatch}
    if recorded is None:
        if subject not in _WARNED:
            _WARNED.add(subject)
            logger.warning("%s records no base model fingerprint (%s): cannot check that %s is the model it belongs to",
                           subject, unrecorded or "made before they were recorded", model)
        return record
    if actual != recorded:
        message = (f"{subject} belongs to the base model with fingerprint {recorded}, but {model} has fingerprint "
                   f"{actual}: its config or weights differ (another seed, a fine-tuned copy, another quantization, "
                   "or loaded in float16)")
        if not allow_base_mismatch:
            raise UsageError(f"{message}. If this is intended, pass --allow_base_mismatch (allow_base_mismatch=True); "
                             "the results then record the mismatch.")
        if (subject, model) not in _WARNED:
            _WARNED.add((subject, model))
            logger.warning("%s (allowed by --allow_base_mismatch)", message)
    return record


def load_causal_lm(args: PretrainedModelArguments, vocab_size: int | None = None) -> torch.nn.Module:
    """The base model described by ``args``; a from-scratch model gets ``vocab_size`` unless overridden."""
    dtype = getattr(torch, args.torch_dtype)
    if args.model_name_or_path is not None:
        check_exists(args.model_name_or_path, "--model_name_or_path")
        kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
        with loading(args.model_name_or_path, "--model_name_or_path"):
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype, **kwargs)
        if args.gguf_file:
            forget_gguf_quantization(model)
    else:
        if args.model_type not in CONFIG_MAPPING:
            raise UsageError(f"--model_type {args.model_type!r} is not a transformers architecture")
        config = CONFIG_MAPPING[args.model_type]()
        if vocab_size is not None:
            config.vocab_size = vocab_size
        if args.config_overrides:
            try:
                config.update_from_string(args.config_overrides)
            except ValueError as err:
                raise UsageError(f"--config_overrides {args.config_overrides!r}: {err}") from None
        check_sizes(config.to_dict(), f"--model_type {args.model_type} --config_overrides {args.config_overrides!r}")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        logger.info("Built a %s model from scratch: %.2fM parameters", args.model_type, model.num_parameters() / 1e6)
    arch_spec(model.config.model_type)  # fail early on an architecture the key hook does not know
    return model


def forget_gguf_quantization(model: torch.nn.Module) -> None:
    """Make a model loaded from GGUF an ordinary float model.

    transformers dequantizes GGUF weights into plain float ``nn.Linear`` layers but keeps its GGUF
    quantizer on the model: the Trainer then refuses to fine-tune it ("purely quantized models") and
    ``save_pretrained`` writes a ``quantization_config`` that makes the saved directory unloadable
    without the GGUF file. Nothing is quantized any more, so both markers go.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def model_tokenizer_path(args: PretrainedModelArguments) -> tuple[str, str | None]:
    """Where the tokenizer of ``args`` comes from: (path, gguf file or None)."""
    if args.tokenizer_name is not None:
        return args.tokenizer_name, None
    return args.model_name_or_path, args.gguf_file


def describe_model(args: PretrainedModelArguments) -> dict:
    """How to load this model again, for ``meta.json``."""
    return {"model_name_or_path": local_path_or_name(args.model_name_or_path), "gguf_file": args.gguf_file,
            "model_type": getattr(args, "model_type", None), "config_overrides": getattr(args, "config_overrides", None)}


def check_tokenizer(model_args: PretrainedModelArguments, dataset_meta: dict, dataset_dir: str):
    """Load the model's tokenizer and make sure the dataset was tokenized with the same one."""
    path, gguf_file = model_tokenizer_path(model_args)
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    try:
        tokenizer = load_tokenizer(path, gguf_file, flag)
    except UsageError:
        raise
    except (OSError, ValueError) as err:  # a model directory saved without its tokenizer
        logger.warning("No tokenizer found with the model (%s); only the vocabulary size is checked.", err)
        return None
    fingerprint = tokenizer_fingerprint(tokenizer)
    expected = dataset_meta["tokenizer"]["fingerprint"]
    if fingerprint != expected:
        raise UsageError(
            f"--dataset_name {dataset_dir} was tokenized with {dataset_meta['tokenizer']['path']} "
            f"(fingerprint {expected}), but the model's tokenizer {path} has fingerprint {fingerprint}. "
            "Preprocess the data again with the model's tokenizer."
        )
    return tokenizer


def check_vocab(model: torch.nn.Module, dataset_meta: dict, dataset_dir: str) -> None:
    max_id = max(s["max_token_id"] for s in dataset_meta["splits"].values())
    vocab = model.get_output_embeddings().weight.shape[0]
    if max_id >= vocab:
        raise UsageError(f"--dataset_name {dataset_dir} has token id {max_id}, but the model's vocabulary has only {vocab} entries")


def load_model_for_dataset(model_args: PretrainedModelArguments, dataset_meta: dict, dataset_dir: str):
    """The base model and its tokenizer, checked against the tokenizer a preprocessed dataset was made with."""
    tokenizer = check_tokenizer(model_args, dataset_meta, dataset_dir)
    model = load_causal_lm(model_args, vocab_size=dataset_meta["tokenizer"]["vocab_size"])
    check_vocab(model, dataset_meta, dataset_dir)
    if model_args.model_name_or_path is None and tokenizer is not None:
        use_tokenizer_special_ids(model, tokenizer)
    return model, tokenizer


def use_tokenizer_special_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a from-scratch model its tokenizer's bos/eos/pad ids (a fresh config has the architecture's defaults,
    e.g. GPT-2's 50256, which may lie outside a small vocabulary)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        setattr(model.config, name, value)
        if model.generation_config is not None:
            setattr(model.generation_config, name, value)
