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
``mlp_memory_config.json`` beside the memory may record another ``layer_position``, which the released
scripts never pass on (their evaluate_joint builds ``MLPMemory`` without it): ``--to official`` warns
when it writes a memory of another block.

The weight names of each layout and how they map to ours are part of the memory style's record
(`models.memory_styles.MemoryStyle.released`, a `ReleasedLayout`); a style without one (Gemma) and a base
family the released code does not know (Qwen, Phi-3, OLMo 2, GPT-NeoX, ...) have no released form.

`released_directory` / `load_released` let `models.load_memory` read such a directory into our classes
(`models.modeling_mlp_memory`); such a memory records no base model, layer or tokenizer, so the joint
checks warn that its base cannot be verified (`models.configuration_mlp_memory.check_memory_matches`).
`released_config` / `released_state_dict` / `write_released` write ours in the released layout. The
command line, ``python -m models.convert --from official`` / ``--to official``, is `models.convert`.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from models.configuration_mlp_memory import MemoryConfig
from models.memory_styles import MEMORY_STYLES, MemoryStyle, ReleasedLayout
from models.modeling_mlp_memory import MEMORY_MODELS, MLPMemoryPreTrainedModel
from utils.architectures import ARCHITECTURES
from utils.cli import UsageError
from utils.io import ArtifactError, read_json, timed, write_json

logger = logging.getLogger(__name__)

CONFIG = "config.json"
LAYER_FILE = "mlp_memory_config.json"  # MLPMemory.save_pretrained: {"layer_position": ..., "is_train": ...}
SUBDIRECTORY = "knn_generator"  # where MLPMemory.save_pretrained puts the memory
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
KEPT_PREFIX, DROPPED_PREFIX = "knn_generator.", "base_lm."

# The styles the released code has, by the base model_type its config.json keeps (gpt2, llama, mistral).
RELEASED_STYLES: dict[str, MemoryStyle] = {
    style.released.model_type: style for style in MEMORY_STYLES.values() if style.released is not None}


def known_layouts() -> str:
    """The layouts `models.load_memory` reads, for error messages."""
    released = "; ".join(style.released.describe() for style in RELEASED_STYLES.values())
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
            return directory if model_type in RELEASED_STYLES else None
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

    style: MemoryStyle
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    bias: bool
    dtype: torch.dtype

    @property
    def layout(self) -> ReleasedLayout:
        return self.style.released


def recognise(config: dict, state: dict[str, torch.Tensor], where: str) -> Found:
    """Match a released config.json and its (unprefixed) tensors against the released layouts; a `UsageError`
    naming what differs and the layouts known otherwise."""
    style = RELEASED_STYLES.get(config.get("model_type"))
    if style is None:
        raise UsageError(f"{where}: config.json's model_type {config.get('model_type')!r} is no memory layout; "
                         f"{known_layouts()}")
    layout = style.released
    indices = {int(m.group(1)) for key in state if (m := re.match(rf"{layout.blocks}\.(\d+)\.", key))}
    num_layers = max(indices) + 1 if indices else 0
    bias = layout.bias == "always" or (layout.bias == "optional" and
                                       f"{layout.blocks}.0.{next(iter(layout.biases))}" in state)
    expected = layout.names(num_layers, bias)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected or not num_layers:
        found = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
        detail = (f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; " if missing else "") + \
                 (f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}; " if unexpected else "")
        raise UsageError(f"{where} holds a {layout.model_type} model, not an MLP memory: its weights ({len(state)} "
                         f"tensors: {found}) are not a released {layout.memory_class} memory "
                         f"({detail.rstrip('; ') or 'no blocks'}); {known_layouts()}")
    if config.get(layout.activation_field, layout.activations[0]) not in layout.activations:
        raise UsageError(f"{where}: {layout.activation_field} {config[layout.activation_field]!r} is not supported "
                         f"(this project's {style.name} memory computes {layout.activations[0]})")
    vocab_size, hidden_size = state["lm_head.weight"].shape
    if config.get(layout.hidden_field, hidden_size) != hidden_size:
        raise UsageError(f"{where}: config.json's {layout.hidden_field} is {config[layout.hidden_field]}, but lm_head.weight "
                         f"is {tuple(state['lm_head.weight'].shape)}")
    _, transposed = layout.block[layout.width_key]
    width = state[f"{layout.blocks}.0.{layout.width_key}"]
    intermediate_size = width.shape[1] if transposed else width.shape[0]  # rows of our (I, d) weight
    dtypes = {t.dtype for t in state.values()}
    return Found(style, num_layers, int(hidden_size), int(intermediate_size), int(vocab_size), bias,
                 dtypes.pop() if len(dtypes) == 1 else torch.float32)


def memory_config(config: dict, found: Found, **record) -> MemoryConfig:
    """Our config for a recognised released memory: sizes from the weights, norm epsilon and dropout from
    its config.json, ``record`` (base_model, layer, ...) as given."""
    layout, style = found.layout, found.style
    fields = dict(hidden_size=found.hidden_size, vocab_size=found.vocab_size, num_layers=found.num_layers,
                  intermediate_size=found.intermediate_size, ffn_bias=found.bias,
                  base_architecture=layout.model_type, released_layout=layout.model_type, **record)
    if layout.eps_field in config:
        fields["norm_eps"] = config[layout.eps_field]
    if "initializer_range" in config:
        fields["initializer_range"] = config["initializer_range"]
    if layout.dropout_field:
        fields["dropout"] = config.get(layout.dropout_field, style.dropout)  # GPT2MLP's dropout
    return MemoryConfig.for_style(style.name, **fields)


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
                "vocabulary %d, %s, %.1fM parameters; it records no base model%s", found.layout.model_type,
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
        raise ArtifactError(f"The released {found.layout.model_type} memory's tensors do not have consistent shapes: "
                            f"{str(err).splitlines()[-1].strip()}") from None
    memory.config.dtype = next(memory.parameters()).dtype
    return memory.eval()


# ---------------------------------------------------------------------------------------------------
# Writing ours in the released layout


def released_state_dict(memory: MLPMemoryPreTrainedModel) -> dict[str, torch.Tensor]:
    """The memory's tensors under the released names (GPT-2 linears transposed to ``Conv1D``'s ``[in, out]``)."""
    layout = memory.config.style.released
    ours = memory.state_dict()
    names = layout.names(memory.config.num_layers, memory.config.ffn_bias)
    return {key: (ours[our_key].t() if transposed else ours[our_key]).detach().contiguous().clone()
            for key, (our_key, transposed) in names.items()}


def released_style(memory_config: MemoryConfig, base_model_type: str | None, where: str) -> MemoryStyle:
    """The style of a memory the released code can run beside a ``base_model_type`` base; a one-line
    `UsageError` for a family it has no memory for (it dispatches on the base's model_type)."""
    style = RELEASED_STYLES.get(base_model_type)
    if style is None:
        family = ARCHITECTURES[base_model_type].family if base_model_type in ARCHITECTURES else base_model_type
        raise UsageError(f"--to official: {where} is a {family} model ({base_model_type}), for which the released "
                         f"implementation has no memory (it knows {', '.join(RELEASED_STYLES)} base models); keep this "
                         "memory in this project's format")
    if style.name != memory_config.memory_style:
        raise UsageError(f"A {memory_config.memory_style}-style memory cannot be written as a released "
                         f"{style.released.memory_class} for a {base_model_type} base model")
    return style


def released_config(memory_config: MemoryConfig, base_config, where: str = "the base model"):
    """The base model's config with the memory's depth, as the released code saves a memory (and, where ours
    differs, the fields the released classes read: the width, Llama's ``mlp_bias``, the norm epsilon); a
    `UsageError` for a memory the released classes cannot express."""
    layout = released_style(memory_config, base_config.model_type, where).released
    d, inner, bias = memory_config.hidden_size, memory_config.intermediate_size, memory_config.ffn_bias
    if (base_config.hidden_size, base_config.vocab_size) != (d, memory_config.vocab_size):
        raise UsageError(f"The base model has hidden size {base_config.hidden_size} and vocabulary {base_config.vocab_size}, "
                         f"the memory {d} and {memory_config.vocab_size}")
    if layout.width_field is None and inner != 4 * d:
        raise UsageError(f"The released {layout.memory_class} has width 4 * {layout.hidden_field} = {4 * d}; this "
                         f"memory's is {inner}")
    if layout.bias != "optional" and (layout.bias == "always") != bias:
        raise UsageError(f"The released {layout.memory_class} {layout.bias} has FFN biases; this memory has "
                         f"{'them' if bias else 'none'}")
    activation = getattr(base_config, layout.activation_field, layout.activations[0])
    if activation not in layout.activations:
        raise UsageError(f"The base model's {layout.activation_field} is {activation!r}: the released code would "
                         f"apply it, but this memory computes {layout.activations[0]}")
    config = copy.deepcopy(base_config)
    setattr(config, layout.depth_field, memory_config.num_layers)
    changed = {}
    if layout.width_field and getattr(config, layout.width_field) != inner:
        changed[layout.width_field] = inner
    if layout.bias_field and bool(getattr(config, layout.bias_field, False)) != bias:
        changed[layout.bias_field] = bias
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
