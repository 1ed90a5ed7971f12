"""The released implementation's memory layout (github.com/Binn0/MLPMemory): recognised, read and written.

What the released code defines (``models/mlpGPT2.py``, ``mlpLlama.py``, ``mlpMistral.py``, ``mlpMemory.py``):

* The memory's config is the base LM's own config with only the depth changed (``n_layer`` 54 for
  GPT2-large; ``num_hidden_layers`` 8 for Mistral-7B, ``intermediate_size`` kept), saved as the root
  ``config.json``: its ``model_type`` / ``architectures`` are still the base model's.
* GPT-2 layout (``GPT2MLPModel``), ``i`` < ``n_layer``::

      h.{i}.ln_1.{weight,bias}          LayerNorm(n_embd, eps=layer_norm_epsilon), applied to x.float()
      h.{i}.mlp.c_fc.{weight,bias}      Conv1D: weight [n_embd, 4 n_embd] ([in, out]: y = x @ W + b)
      h.{i}.mlp.c_proj.{weight,bias}    Conv1D: weight [4 n_embd, n_embd]
      ln_f.{weight,bias}
      lm_head.weight                    [vocab, n_embd], no bias

  a block is ``x + c_proj(act(c_fc(ln_1(x))))`` with ``act = ACT2FN[activation_function]`` (``gelu_new``,
  the tanh GELU, for every GPT-2), and the width is ``4 * n_embd`` whatever ``n_inner`` says.
* Llama / Mistral layout (``LlamaMLPModel`` / ``MistralMLPModel``)::

      layers.{i}.input_layernorm.weight               RMSNorm(hidden_size, eps=rms_norm_eps)
      layers.{i}.mlp.{gate,up,down}_proj.weight       nn.Linear ([out, in]), + .bias for Llama with mlp_bias
      norm.weight, lm_head.weight

  a block is ``x + down(act(gate(n)) * up(n))`` with ``n = input_layernorm(x)``, ``act = ACT2FN[hidden_act]``
  (silu). Mistral never has FFN biases.
* An ``embedding_transform`` linear exists only when input and output dimensions differ, which the
  released scripts never do (both are the base's hidden size); it is refused here.
* Weights: ``model.safetensors`` or ``pytorch_model.bin`` (``MLPMemory.save_pretrained`` writes the latter,
  ``safe_serialization=False``, into ``<dir>/knn_generator/`` beside ``<dir>/mlp_memory_config.json``).
  ``accelerator.save_state`` of the online trainer saves the whole ``MLPMemory``: keys prefixed
  ``knn_generator.`` (the memory) and ``base_lm.`` (the frozen base, dropped here).

Which hidden state the released memory reads: ``MLPMemory`` registers a forward hook on
``base.transformer.h[layer_position].mlp`` (GPT-2) or ``base.model.layers[layer_position].mlp``
(Llama/Mistral) and keeps ``inputs[0]``: the *input of the feed-forward module* of block
``layer_position`` -- the output of ``ln_2`` / ``post_attention_layernorm`` -- which is exactly our
``layer`` (`utils.architectures`). ``layer_position`` is -1 (the last block) in every released script
(train_mlpmem_online, evaluate_joint), so the last block is the default here; a
``mlp_memory_config.json`` beside the memory may record another ``layer_position``.

`released_directory` / `load_released` let `models.load_memory` read such a directory into our classes
(`models.modeling_mlp_memory`); such a memory records no base model, layer or tokenizer, so the joint
checks warn that its base cannot be verified (`models.configuration_mlp_memory.check_memory_matches`).
``python -m models.convert --from official`` writes it in our format with the base model recorded, and
``--to official`` writes ours in the released layout:

    python -m models.convert --from official --input DIR --output DIR --base_model BASE [--layer L]
    python -m models.convert --to official --input OURS --output DIR [--base_model BASE]
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.configuration_mlp_memory import MemoryConfig, check_memory_matches
from models.modeling_mlp_memory import MEMORY_MODELS, MLPMemoryPreTrainedModel
from utils.cli import UsageError, parse_args, setup_logging
from utils.io import ArtifactError, check_writable, partial_path, read_json, timed, write_json

logger = logging.getLogger(__name__)

CONFIG = "config.json"
LAYER_FILE = "mlp_memory_config.json"  # MLPMemory.save_pretrained: {"layer_position": ..., "is_train": ...}
SUBDIRECTORY = "knn_generator"  # where MLPMemory.save_pretrained puts the memory
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
KEPT_PREFIX, DROPPED_PREFIX = "knn_generator.", "base_lm."


@dataclass(frozen=True)
class ReleasedLayout:
    """One released memory class: its config fields and its weight names, each mapped to ours.

    ``block`` maps a released key inside block ``i`` (after ``{blocks}.{i}.``) to (our key inside
    ``blocks.{i}.``, whether the tensor is transposed: GPT-2's ``Conv1D`` stores ``[in, out]``).
    """

    name: str  # the base's model_type, which the released config keeps; also our memory style
    memory_class: str  # the released class, for messages
    blocks: str  # "h" or "layers"
    depth_field: str
    hidden_field: str
    eps_field: str
    activation_field: str
    activations: tuple[str, ...]  # the activations our block computes
    block: dict[str, tuple[str, bool]]
    block_bias: dict[str, tuple[str, bool]]  # present when the FFN has biases
    final: dict[str, str]

    def names(self, num_layers: int, bias: bool) -> dict[str, tuple[str, bool]]:
        """Every released key of a memory of ``num_layers`` blocks -> (our key, transposed)."""
        block = {**self.block, **(self.block_bias if bias else {})}
        names = {f"{self.blocks}.{i}.{key}": (f"blocks.{i}.{ours}", transposed)
                 for i in range(num_layers) for key, (ours, transposed) in block.items()}
        return {**names, **{key: (ours, False) for key, ours in self.final.items()}}

    def describe(self) -> str:
        block = ", ".join(f"{self.blocks}.{{i}}.{key}" for key in self.block)
        return f"{self.name} ({self.memory_class}: {block}, {', '.join(self.final)})"


_SWIGLU = {"input_layernorm.weight": ("norm.weight", False), "mlp.gate_proj.weight": ("ffn.gate.weight", False),
           "mlp.up_proj.weight": ("ffn.up.weight", False), "mlp.down_proj.weight": ("ffn.down.weight", False)}
_SWIGLU_BIAS = {"mlp.gate_proj.bias": ("ffn.gate.bias", False), "mlp.up_proj.bias": ("ffn.up.bias", False),
                "mlp.down_proj.bias": ("ffn.down.bias", False)}
_RMS_FINAL = {"norm.weight": "final_norm.weight", "lm_head.weight": "lm_head.weight"}

LAYOUTS: dict[str, ReleasedLayout] = {
    "gpt2": ReleasedLayout(
        name="gpt2", memory_class="GPT2MLPModel", blocks="h", depth_field="n_layer", hidden_field="n_embd",
        eps_field="layer_norm_epsilon", activation_field="activation_function",
        activations=("gelu_new", "gelu_pytorch_tanh"),
        block={"ln_1.weight": ("norm.weight", False), "ln_1.bias": ("norm.bias", False),
               "mlp.c_fc.weight": ("ffn.fc.weight", True), "mlp.c_fc.bias": ("ffn.fc.bias", False),
               "mlp.c_proj.weight": ("ffn.proj.weight", True), "mlp.c_proj.bias": ("ffn.proj.bias", False)},
        block_bias={},
        final={"ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias", "lm_head.weight": "lm_head.weight"}),
    "llama": ReleasedLayout(
        name="llama", memory_class="LlamaMLPModel", blocks="layers", depth_field="num_hidden_layers",
        hidden_field="hidden_size", eps_field="rms_norm_eps", activation_field="hidden_act", activations=("silu",),
        block=_SWIGLU, block_bias=_SWIGLU_BIAS, final=_RMS_FINAL),
    "mistral": ReleasedLayout(
        name="mistral", memory_class="MistralMLPModel", blocks="layers", depth_field="num_hidden_layers",
        hidden_field="hidden_size", eps_field="rms_norm_eps", activation_field="hidden_act", activations=("silu",),
        block=_SWIGLU, block_bias={}, final=_RMS_FINAL),
}


def known_layouts() -> str:
    """The layouts `models.load_memory` reads, for error messages."""
    released = "; ".join(layout.describe() for layout in LAYOUTS.values())
    return (f"it reads this project's memory directories (config.json of model_type mlp_memory_*, with meta.json) "
            f"and the released implementation's layouts: {released}")


# ---------------------------------------------------------------------------------------------------
# Recognising and reading a released directory


def released_directory(path: str | os.PathLike) -> Path | None:
    """The directory holding a released memory at ``path`` (``path`` itself, or the ``knn_generator/`` that
    ``MLPMemory.save_pretrained`` writes inside it), judged by its config.json's ``model_type`` (a base
    model's: gpt2, llama, mistral); None for anything else (this project's format, or no config)."""
    for directory in (Path(path), Path(path) / SUBDIRECTORY):
        if (directory / CONFIG).is_file():
            try:
                model_type = read_json(directory / CONFIG).get("model_type")
            except (OSError, ValueError, AttributeError):  # unreadable: left to the caller's own error
                return None
            return directory if model_type in LAYOUTS else None
    return None


def weight_files(directory: Path, flag: str) -> list[Path]:
    """The weight files of a released directory: safetensors (sharded or not) first, else the pickled ``.bin``."""
    for index, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PICKLE_INDEX, PICKLE)):
        if (directory / index).is_file():
            try:
                shards = sorted(set(read_json(directory / index)["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise ArtifactError(f"{flag} {directory / index} is not a shard index ({err})") from None
            return [directory / shard for shard in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise UsageError(f"{flag} {directory}: no {SAFETENSORS} or {PICKLE} (nor a sharded index) beside config.json")


def read_tensors(file: Path, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; a pickle is read with ``weights_only=True`` only (never arbitrary objects)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise ArtifactError(f"{flag} {file} is missing (listed by the shard index)")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{flag} {file}: cannot read the weights, the file is truncated or corrupt ({err})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as err:  # objects; a corrupt file
        raise ArtifactError(f"{flag} {file}: refused, it is not a plain tensor state dict loadable with "
                            f"weights_only=True ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{flag} {file}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def memory_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The memory's own tensors: with ``knn_generator.``-prefixed keys (a saved ``MLPMemory``), those keys with the
    prefix stripped and ``base_lm.`` dropped; otherwise the state as it is. Also says which it was, for the log."""
    if not any(key.startswith(KEPT_PREFIX) for key in state):
        return state, "unprefixed keys"
    kept = {key[len(KEPT_PREFIX):]: value for key, value in state.items() if key.startswith(KEPT_PREFIX)}
    other = {key: value for key, value in state.items() if not key.startswith((KEPT_PREFIX, DROPPED_PREFIX))}
    dropped = len(state) - len(kept) - len(other)
    return {**kept, **other}, f"keys prefixed {KEPT_PREFIX} kept, {dropped} {DROPPED_PREFIX} keys dropped"


@dataclass
class Found:
    """What was recognised in a released directory."""

    layout: ReleasedLayout
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    bias: bool
    dtype: torch.dtype


def recognise(config: dict, state: dict[str, torch.Tensor], where: str) -> Found:
    """Match a released config.json and its (unprefixed) tensors against `LAYOUTS`; a `UsageError` naming what
    differs and the layouts known otherwise."""
    layout = LAYOUTS.get(config.get("model_type"))
    if layout is None:
        raise UsageError(f"{where}: config.json's model_type {config.get('model_type')!r} is no memory layout; "
                         f"{known_layouts()}")
    indices = {int(m.group(1)) for key in state if (m := re.match(rf"{layout.blocks}\.(\d+)\.", key))}
    num_layers = max(indices) + 1 if indices else 0
    bias = f"{layout.blocks}.0.mlp.gate_proj.bias" in state
    expected = layout.names(num_layers, bias)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected or not num_layers:
        found = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
        detail = (f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; " if missing else "") + \
                 (f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}; " if unexpected else "")
        raise UsageError(f"{where} holds a {layout.name} model, not an MLP memory: its weights ({len(state)} tensors: "
                         f"{found}) are not a released {layout.memory_class} memory ({detail.rstrip('; ') or 'no blocks'}); "
                         f"{known_layouts()}")
    if layout.activations and config.get(layout.activation_field, layout.activations[0]) not in layout.activations:
        raise UsageError(f"{where}: {layout.activation_field} {config[layout.activation_field]!r} is not supported "
                         f"(this project's {layout.name} memory computes {layout.activations[0]})")
    vocab_size, hidden_size = state["lm_head.weight"].shape
    if config.get(layout.hidden_field, hidden_size) != hidden_size:
        raise UsageError(f"{where}: config.json's {layout.hidden_field} is {config[layout.hidden_field]}, but lm_head.weight "
                         f"is {tuple(state['lm_head.weight'].shape)}")
    first_up = state[f"{layout.blocks}.0.mlp.c_fc.weight" if layout.name == "gpt2" else f"{layout.blocks}.0.mlp.up_proj.weight"]
    intermediate_size = first_up.shape[1] if layout.name == "gpt2" else first_up.shape[0]
    dtypes = {t.dtype for t in state.values()}
    return Found(layout, num_layers, int(hidden_size), int(intermediate_size), int(vocab_size), bias,
                 dtypes.pop() if len(dtypes) == 1 else torch.float32)


def memory_config(config: dict, found: Found, **record) -> MemoryConfig:
    """Our config for a recognised released memory: sizes from the weights, norm epsilon and dropout from
    its config.json, ``record`` (base_model, layer, ...) as given."""
    layout = found.layout
    fields = dict(hidden_size=found.hidden_size, vocab_size=found.vocab_size, num_layers=found.num_layers,
                  intermediate_size=found.intermediate_size, ffn_bias=layout.name == "gpt2" or found.bias,
                  base_architecture=layout.name, released_layout=layout.name, **record)
    if layout.eps_field in config:
        fields["norm_eps"] = config[layout.eps_field]
    if "initializer_range" in config:
        fields["initializer_range"] = config["initializer_range"]
    if layout.name == "gpt2":
        fields["dropout"] = config.get("resid_pdrop", 0.1)  # GPT2MLP's dropout
    return MemoryConfig.for_style(layout.name, **fields)


def released_layer(directory: Path) -> int | None:
    """The ``layer_position`` a released ``mlp_memory_config.json`` records (in the directory or, for a
    ``knn_generator/``, above it), None when there is none."""
    for place in (directory, directory.parent) if directory.name == SUBDIRECTORY else (directory,):
        if (place / LAYER_FILE).is_file():
            try:
                return int(read_json(place / LAYER_FILE)["layer_position"])
            except (ValueError, KeyError, TypeError) as err:
                raise ArtifactError(f"{place / LAYER_FILE}: no integer layer_position ({err})") from None
    return None


def load_released(path: str | os.PathLike, flag: str = "--knn_generator_path", dtype: torch.dtype | None = None,
                  **record) -> MLPMemoryPreTrainedModel:
    """The released memory in ``path`` (see `released_directory`) as one of our networks, in eval mode.

    Its weights keep their dtype unless ``dtype`` is given; ``record`` fills the config's provenance fields
    (none by default: the released files record no base model, tokenizer or layer, except a
    ``layer_position`` >= 0 in ``mlp_memory_config.json``; -1, the released default, is left as "the last block").
    """
    directory = released_directory(path)
    if directory is None:
        raise UsageError(f"{flag} {path}: not a released memory directory; {known_layouts()}")
    config = read_json(directory / CONFIG)
    files = weight_files(directory, flag)
    with timed(f"Reading the released memory {directory}", logger):
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(read_tensors(file, flag))
    state, prefix = memory_tensors(state)
    found = recognise(config, state, f"{flag} {path}")
    if "layer" not in record:
        layer = released_layer(directory)
        record["layer"] = layer if layer is not None and layer >= 0 else None
    memory = build_released(memory_config(config, found, **record), found, state, dtype)
    memory.config._name_or_path = str(path)  # as from_pretrained sets it: messages name the memory
    logger.info("Recognised the released %s memory layout (%s) in %s (%s, %s): %d blocks, width %d, hidden size %d, "
                "vocabulary %d, %s, %.1fM parameters; it records no base model%s", found.layout.name,
                found.layout.memory_class, directory, ", ".join(f.name for f in files), prefix, found.num_layers,
                found.intermediate_size, found.hidden_size, found.vocab_size, found.dtype,
                memory.num_parameters() / 1e6,
                "" if memory.config.layer is None else f"; layer_position {memory.config.layer}")
    if config.get(found.layout.depth_field, found.num_layers) != found.num_layers:
        logger.info("%s's %s is %s (the base model's config, as a released step checkpoint saves it); the weights "
                    "hold %d blocks", directory / CONFIG, found.layout.depth_field,
                    config[found.layout.depth_field], found.num_layers)
    return memory


def build_released(config: MemoryConfig, found: Found, state: dict[str, torch.Tensor],
                   dtype: torch.dtype | None) -> MLPMemoryPreTrainedModel:
    """Our network holding the released tensors (transposed where the layout says), without random initialisation."""
    names = found.layout.names(found.num_layers, found.bias)
    ours = {}
    for key, (our_key, transposed) in names.items():
        tensor = state[key].t().contiguous() if transposed else state[key]
        ours[our_key] = tensor.to(dtype) if dtype is not None else tensor
    with torch.device("meta"):
        memory = MEMORY_MODELS[config.memory_style](config)
    try:
        memory.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise ArtifactError(f"The released {found.layout.name} memory's tensors do not have consistent shapes: "
                            f"{str(err).splitlines()[-1].strip()}") from None
    memory.config.dtype = next(memory.parameters()).dtype
    return memory.eval()


# ---------------------------------------------------------------------------------------------------
# Writing ours in the released layout


def released_state_dict(memory: MLPMemoryPreTrainedModel) -> dict[str, torch.Tensor]:
    """The memory's tensors under the released names (GPT-2 linears transposed to ``Conv1D``'s ``[in, out]``)."""
    layout = LAYOUTS[memory.config.memory_style]
    ours = memory.state_dict()
    names = layout.names(memory.config.num_layers, layout.name != "gpt2" and memory.config.ffn_bias)
    return {key: (ours[our_key].t() if transposed else ours[our_key]).detach().contiguous().clone()
            for key, (our_key, transposed) in names.items()}


def released_config(memory_config: MemoryConfig, base_config):
    """The base model's config with the memory's depth, as the released code saves a memory (and, where ours
    differs, the fields the released classes read: Llama/Mistral ``intermediate_size``, Llama ``mlp_bias``, the
    norm epsilon); a `UsageError` for a memory the released classes cannot express."""
    style = memory_config.memory_style
    if base_config.model_type not in LAYOUTS:
        raise UsageError(f"The released implementation supports gpt2, llama and mistral base models, not "
                         f"{base_config.model_type!r}")
    layout = LAYOUTS[base_config.model_type]
    if layout.name != style:
        raise UsageError(f"A {style}-style memory cannot be written as a released {layout.memory_class} for a "
                         f"{base_config.model_type} base model")
    if (base_config.hidden_size, base_config.vocab_size) != (memory_config.hidden_size, memory_config.vocab_size):
        raise UsageError(f"The base model has hidden size {base_config.hidden_size} and vocabulary {base_config.vocab_size}, "
                         f"the memory {memory_config.hidden_size} and {memory_config.vocab_size}")
    if style == "gpt2" and memory_config.intermediate_size != 4 * memory_config.hidden_size:
        raise UsageError(f"The released GPT2MLPModel has width 4 * n_embd = {4 * memory_config.hidden_size}; this "
                         f"memory's is {memory_config.intermediate_size}")
    if style == "gpt2" and not memory_config.ffn_bias:
        raise UsageError("The released GPT2MLPModel always has FFN biases; this memory has none")
    activation = getattr(base_config, layout.activation_field, layout.activations[0])
    if activation not in layout.activations:
        raise UsageError(f"The base model's {layout.activation_field} is {activation!r}: the released code would "
                         f"apply it, but this memory computes {layout.activations[0]}")
    config = copy.deepcopy(base_config)
    setattr(config, layout.depth_field, memory_config.num_layers)
    changed = {}
    if style != "gpt2" and config.intermediate_size != memory_config.intermediate_size:
        changed["intermediate_size"] = memory_config.intermediate_size
    if style == "llama" and bool(getattr(config, "mlp_bias", False)) != memory_config.ffn_bias:
        changed["mlp_bias"] = memory_config.ffn_bias
    if getattr(config, layout.eps_field) != memory_config.norm_eps:
        changed[layout.eps_field] = memory_config.norm_eps
    for name, value in changed.items():
        setattr(config, name, value)
    if changed:
        logger.info("The released config.json also sets %s (the base model's differ)", changed)
    return config


def write_released(config, state: dict[str, torch.Tensor], directory: Path, layer_position: int) -> None:
    """``config.json`` (`released_config`), ``model.safetensors`` (`released_state_dict`) and ``mlp_memory_config.json``
    into ``directory``."""
    from safetensors.torch import save_file

    config.to_json_file(directory / CONFIG)
    save_file(state, directory / SAFETENSORS, metadata={"format": "pt"})
    write_json(directory / LAYER_FILE, {"layer_position": layer_position, "is_train": False})


# ---------------------------------------------------------------------------------------------------
# The command


@dataclass
class ConvertArguments:
    """``python -m models.convert --from official`` / ``--to official``."""

    input: str = field(metadata={"help": "The memory to convert: a released directory (--from official) or one of "
                                         "this project's memory directories (--to official)."})
    output: str = field(metadata={"help": "Directory to write (built under <output>.partial, renamed when complete)."})
    from_layout: str | None = field(default=None, metadata={
        "aliases": ["--from"], "choices": ["official"],
        "help": "Read the released implementation's layout from --input and write this project's format."})
    to_layout: str | None = field(default=None, metadata={
        "aliases": ["--to"], "choices": ["official"],
        "help": "Read this project's memory from --input and write the released implementation's layout."})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub name or local directory of the base model. --from official: required, recorded with its "
                "fingerprint and tokenizer fingerprint. --to official: its config becomes the root config.json "
                "(default: the base model the memory records)."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file inside --base_model, when the base model is one (dequantised to float on load)."})
    layer: int | None = field(default=None, metadata={
        "help": "--from official: the base block whose feed-forward input the memory reads (default: the "
                "layer_position of mlp_memory_config.json if present, else -1, the last block, as the released code)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace --output if it exists."})

    def __post_init__(self):
        if (self.from_layout is None) == (self.to_layout is None):
            raise UsageError("Give exactly one of --from official or --to official (or --joint, see python -m "
                             "models.convert --help)")
        if self.from_layout and not self.base_model:
            raise UsageError("--from official needs --base_model: the released files do not record the base model, "
                             "which this project's format records and checks")
        if self.layer is not None and self.to_layout:
            raise UsageError("--layer applies to --from official (--to official writes the layer the memory records)")
        if self.gguf_file and not self.base_model:
            raise UsageError("--gguf_file names a file inside --base_model; give --base_model too")
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            raise UsageError(f"--output {self.output} is --input: write the conversion to another directory")


def from_official(args: ConvertArguments) -> dict:
    """Read the released memory, record the base model (fingerprint at the layer, tokenizer) and save it in our
    format with `models.memory_directory.save_memory`; returns the meta.json written."""
    from models.memory_directory import save_memory
    from utils.architectures import arch_spec, transformer_blocks
    from utils.arguments import PretrainedModelArguments
    from utils.modeling import describe_model, load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint

    if released_directory(args.input) is None:
        raise UsageError(f"--input {args.input}: not a released memory directory (" +
                         ("it is in this project's format already: use --to official to export it" if
                          os.path.isfile(os.path.join(args.input, "meta.json")) else known_layouts()) + ")")
    memory = load_released(args.input, "--input")
    base_args = PretrainedModelArguments(model_name_or_path=args.base_model, gguf_file=args.gguf_file)
    with timed("Loading the base model", logger):
        base = load_causal_lm(base_args).eval()
    style = arch_spec(base.config.model_type).memory_style
    if style != memory.config.memory_style:
        raise UsageError(f"--base_model {args.base_model} is a {base.config.model_type} model (a {style}-style memory), "
                         f"but --input {args.input} holds a released {memory.config.memory_style} memory")
    check_memory_matches(memory.config, base, memory_path=args.input)
    num_blocks = len(transformer_blocks(base))
    layer = args.layer
    flag = "--layer"
    if layer is None:
        layer = released_layer(released_directory(args.input))
        layer, flag = (-1, "--layer") if layer is None else (layer, f"layer_position of {LAYER_FILE}")
    if not -num_blocks <= layer < num_blocks:
        raise UsageError(f"{flag} {layer} is out of range for --base_model {args.base_model} ({num_blocks} blocks)")
    layer %= num_blocks
    try:
        fingerprint = tokenizer_fingerprint(load_tokenizer(args.base_model, args.gguf_file, "--base_model"))
    except (OSError, ValueError):
        fingerprint = None
        logger.warning("No tokenizer beside --base_model %s: the memory records no tokenizer fingerprint", args.base_model)
    record = {"base_model": describe_model(base_args), "base_architecture": base.config.model_type, "layer": layer,
              "tokenizer_fingerprint": fingerprint, "base_model_fingerprint": model_fingerprint(base, layer)}
    for name, value in record.items():
        setattr(memory.config, name, value)
    del base
    source = {"layout": memory.config.released_layout, "path": os.path.abspath(args.input)}
    with staged_output(args) as staging:
        return save_memory(staging, memory, {}, {**record, "converted_from": source})


def to_official(args: ConvertArguments) -> Path:
    """Write our memory in the released layout: the base model's config with the memory's depth, its tensors under
    the released names, and the layer as ``mlp_memory_config.json``'s ``layer_position``."""
    from transformers import AutoConfig

    from models.memory_directory import load_memory
    from models.model_card import released_card, write_card
    from utils.modeling import check_exists, loading

    if released_directory(args.input) is not None:
        raise UsageError(f"--input {args.input} is in the released layout already (use --from official to import it)")
    memory = load_memory(args.input, "--input")
    recorded = memory.config.base_model or {}
    base, flag = (args.base_model, "--base_model") if args.base_model else \
        (recorded.get("model_name_or_path"), f"the base model recorded in {args.input}/config.json")
    if not base:
        raise UsageError(f"--input {args.input} records no base model: give --base_model, whose config the released "
                         "layout's config.json is")
    check_exists(base, flag)
    gguf_file = args.gguf_file if args.base_model else recorded.get("gguf_file")
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    with loading(base, flag):
        base_config = AutoConfig.from_pretrained(base, **gguf)
    config = released_config(memory.config, base_config)  # refuses what the released classes cannot express
    num_blocks = getattr(base_config, LAYOUTS[base_config.model_type].depth_field)
    layer = memory.config.layer
    layer_position = -1 if layer is None or layer == num_blocks - 1 else layer
    if layer_position != -1:
        logger.warning("The memory reads block %d of %d: the released scripts read the last block (layer_position -1); "
                       "%s records layer_position %d, which MLPMemory(..., layer_position=%d) takes", layer,
                       num_blocks, LAYER_FILE, layer, layer)
    with staged_output(args) as staging:
        write_released(config, released_state_dict(memory), staging, layer_position)
        source_meta = Path(args.input) / "meta.json"
        write_card(staging, released_card(read_json(source_meta) if source_meta.is_file() else {},
                                          Path(args.output).name, base, layer_position))
    logger.info("Wrote %s in the released %s layout (%d blocks, base config from %s)", args.output,
                memory.config.memory_style, memory.config.num_layers, base)
    return Path(args.output)


@contextmanager
def staged_output(args: ConvertArguments) -> Iterator[Path]:
    """Build --output under ``<output>.partial`` and rename it into place when complete, holding its lock
    (`utils.locking`); an existing --output is replaced only with --overwrite_output_dir, once the new one is complete."""
    from utils.locking import artifact_lock

    output = Path(args.output)
    staging = partial_path(output)
    with artifact_lock(output, "--output"):
        check_output(output, args.overwrite_output_dir)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:  # nothing to resume: a conversion is redone from the start
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing --output without --overwrite_output_dir, a file, or a place that cannot be written."""
    if output.exists() and not overwrite:
        raise UsageError(f"--output {output} already exists; pass --overwrite_output_dir to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a directory")
    check_writable(output, "--output")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    (args,) = parse_args((ConvertArguments,), argv)
    logger.info("Converting: %s", args)
    check_output(Path(args.output), args.overwrite_output_dir)  # before any reading
    if not os.path.exists(args.input):
        raise UsageError(f"--input {args.input}: no such directory")
    if args.from_layout:
        meta = from_official(args)
        print(f"Wrote {args.output}: {json.dumps(meta['memory'])}, base model {args.base_model}, layer {meta['layer']}")
    else:
        to_official(args)
        print(f"Wrote {args.output} in the released layout")
    return 0
