"""Configuration of the MLP memory: its size, its block type, and the base model it belongs to.

One class, `MemoryConfig`, holds every field; each memory style (`models.memory_styles.MEMORY_STYLES`)
gets a subclass made from its record, which declares only what differs: its ``model_type`` for
`AutoConfig` (``mlp_memory_gpt2``, ``mlp_memory_llama``, ...) and the defaults of its style (norm
epsilon, dropout, FFN bias). ``config.style`` is the record.

The config also records what the memory expects next to it -- the base model and the fingerprint of
its weights (`utils.modeling.model_fingerprint`), the block whose feed-forward input is its input
(``layer``), the hidden size, the vocabulary and the tokenizer fingerprint -- and `check_memory_matches`
refuses a base model that does not fit.

Sizes come from a named preset (`MemoryConfig.from_preset`, `PRESETS`), from explicit numbers, or from
the base model (`MemoryConfig.from_base`): by default the memory gets as many parameters as the base
model, as in the paper (GPT2-large, d=1280: 54 blocks, 772.6M parameters).
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedConfig

from models.memory_styles import MEMORY_STYLES, MemoryStyle
from utils.architectures import arch_spec
from utils.cli import UsageError
from utils.modeling import check_model_fingerprint

# Named sizes. hidden_size/vocab_size come from the base model unless a preset fixes them; the paper's
# presets (the released `--base_model_name` values) belong to a style and fix the hidden size they were made for.
PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=2),  # a test / quickstart memory for any base model
    **{name: dict(memory_style=style.name, **sizes) for style in MEMORY_STYLES.values()
       for name, sizes in style.presets.items()},
}


class MemoryConfig(PreTrainedConfig):
    """Every field of a memory; use a style's subclass (`MemoryConfig.for_style`) to build one."""

    model_type = "mlp_memory"
    memory_style: ClassVar[str] = ""
    default_ffn_factor: ClassVar[int] = 4  # intermediate size = factor * hidden size when not given

    hidden_size: int = 768
    vocab_size: int = 50257
    num_layers: int = 2
    intermediate_size: int | None = None
    norm_eps: float = 1e-5
    dropout: float = 0.0
    ffn_bias: bool = True
    initializer_range: float = 0.02
    # What the memory belongs to (recorded, checked by check_memory_matches).
    base_model: dict | None = None  # how to load the base model (utils.modeling.describe_model)
    base_architecture: str | None = None  # the base model's model_type
    layer: int | None = None  # block of the base model whose feed-forward input is the memory's input
    tokenizer_fingerprint: str | None = None
    # utils.modeling.model_fingerprint of the base model whose hidden states were the memory's inputs (None: a
    # memory saved before fingerprints were recorded)
    base_model_fingerprint: str | None = None
    # The released implementation's layout the weights were read from (models/official.py: gpt2, llama, mistral);
    # None for a memory trained here. A released memory records no base model until converted with --base_model.
    released_layout: str | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = self.default_ffn_factor * self.hidden_size
        super().__post_init__(**kwargs)
        self.check_sizes()

    @property
    def style(self) -> MemoryStyle:
        """The record of this config's memory style (`models.memory_styles`)."""
        return MEMORY_STYLES[self.memory_style]

    def check_sizes(self) -> None:
        """Refuse sizes no network can have, naming the flag that sets them."""
        for name, flag in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary size"),
                           ("num_layers", "--num_layers"), ("intermediate_size", "--intermediate_size")):
            if getattr(self, name) < 1:
                raise UsageError(f"{flag} of the memory must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"memory dropout must be in [0, 1), got {self.dropout}")
        if self.memory_style and self.ffn_bias and not self.style.bias_allowed:
            raise UsageError(f"A {self.memory_style}-style memory has no FFN bias (ffn_bias must be False)")

    @staticmethod
    def for_style(memory_style: str, **fields) -> "MemoryConfig":
        """A config of the subclass for ``memory_style`` (a key of `MEMORY_STYLES`)."""
        if memory_style not in STYLE_CONFIGS:
            raise UsageError(f"Unknown memory style {memory_style!r}; choose one of {', '.join(MEMORY_STYLES)}")
        return STYLE_CONFIGS[memory_style](**fields)

    @staticmethod
    def from_preset(name: str, memory_style: str | None = None, **fields) -> "MemoryConfig":
        """A named size (`PRESETS`), completed or overridden by ``fields`` (e.g. hidden_size, vocab_size).

        ``MemoryConfig.from_preset("tiny", hidden_size=32, vocab_size=100)`` is a 2-block GPT-2 style
        memory. A preset made for one hidden size or style refuses another.
        """
        style, sizes = preset_sizes(name, memory_style, fields.get("hidden_size"))
        return MemoryConfig.for_style(style or "gpt2", **{**sizes, **fields})

    @staticmethod
    def from_base(base_config, preset: str | None = None, num_layers: int | None = None,
                  intermediate_size: int | None = None, base_parameters: int | None = None,
                  **record) -> "MemoryConfig":
        """A memory for a base model.

        Style, hidden size, vocabulary, norm epsilon (and, for a gated FFN, the intermediate size and bias)
        come from ``base_config``, as its style's record says (`MemoryStyle.fields_from_base`); a ``preset``
        then sets the depth (and width); explicit ``num_layers`` / ``intermediate_size`` win over both.
        Without any depth, the memory gets the number of blocks that matches ``base_parameters`` (the base
        model's parameter count). ``record`` fills the provenance fields (base_model, layer,
        tokenizer_fingerprint, base_model_fingerprint).
        """
        spec = arch_spec(base_config.model_type)
        style = MEMORY_STYLES[spec.memory_style]
        fields = dict(**style.fields_from_base(base_config, spec), base_architecture=base_config.model_type, **record)
        if preset is not None:
            fields.update(preset_sizes(preset, style.name, base_config.hidden_size)[1])
        if intermediate_size is not None:
            fields["intermediate_size"] = intermediate_size
        if num_layers is not None:
            fields["num_layers"] = num_layers
        config = MemoryConfig.for_style(style.name, **fields)
        if "num_layers" not in fields:
            if base_parameters is None:
                raise UsageError("Give --num_layers, a preset (--base_model_name) or the base model's parameter count "
                                 "to size the memory")
            config.num_layers = layers_for_parameters(config, base_parameters)
        return config

    def describe(self) -> dict:
        """The sizes, for logs and meta.json."""
        return {"memory_style": self.memory_style, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "num_layers": self.num_layers, "intermediate_size": self.intermediate_size,
                "parameters": parameter_count(self)}


def style_config_class(style: MemoryStyle) -> type[MemoryConfig]:
    """The config class of ``style``: its ``model_type`` and, as field defaults, the defaults its record gives."""
    name = f"{style.class_prefix}MemoryConfig"
    return type(name, (MemoryConfig,), {
        "__module__": __name__, "__qualname__": name, "__doc__": style.summary,
        "model_type": style.model_type, "memory_style": style.name,
        "__annotations__": {"norm_eps": float, "dropout": float, "ffn_bias": bool},
        "norm_eps": style.norm_eps, "dropout": style.dropout, "ffn_bias": style.ffn_bias})


STYLE_CONFIGS: dict[str, type[MemoryConfig]] = {
    name: style_config_class(style) for name, style in MEMORY_STYLES.items()}
# Importable by name (pickling finds a class by its module and name).
GPT2MemoryConfig, LlamaMemoryConfig = STYLE_CONFIGS["gpt2"], STYLE_CONFIGS["llama"]
MistralMemoryConfig, GemmaMemoryConfig = STYLE_CONFIGS["mistral"], STYLE_CONFIGS["gemma"]


def preset_sizes(name: str, memory_style: str | None, hidden_size: int | None) -> tuple[str | None, dict]:
    """The style a preset fixes (or None) and its size fields; refuse a clash with the base model."""
    if name not in PRESETS:
        raise UsageError(f"Unknown memory preset {name!r} (--base_model_name); choose one of {', '.join(PRESETS)}")
    sizes = dict(PRESETS[name])
    style = sizes.pop("memory_style", None) or memory_style
    if memory_style is not None and style != memory_style:
        raise UsageError(f"Memory preset {name!r} is a {style}-style memory, but the base model needs a {memory_style}-style one")
    fixed_dim = sizes.get("hidden_size")
    if fixed_dim is not None and hidden_size is not None and hidden_size != fixed_dim:
        raise UsageError(f"Memory preset {name!r} is made for hidden size {fixed_dim}, but the base model has {hidden_size}")
    return style, sizes


# ---------------------------------------------------------------------------------------------------
# Parameter counts, from the style's norm and FFN (checked against the built network in the tests)


def norm_parameters(config: MemoryConfig) -> int:
    return config.style.norm_parameters(config.hidden_size)


def block_parameters(config: MemoryConfig) -> int:
    """Parameters of one block, its norm and its FFN (`MemoryStyle.block_parameters`)."""
    return config.style.block_parameters(config.hidden_size, config.intermediate_size, config.ffn_bias)


def parameter_count(config: MemoryConfig) -> int:
    """All parameters: the blocks, the final norm and the untied head (d x V, no bias)."""
    return config.num_layers * block_parameters(config) + norm_parameters(config) + config.hidden_size * config.vocab_size


def layers_for_parameters(config: MemoryConfig, target: int) -> int:
    """The number of blocks that brings the memory closest to ``target`` parameters (at least 1)."""
    fixed = norm_parameters(config) + config.hidden_size * config.vocab_size
    return max(1, round((target - fixed) / block_parameters(config)))


# ---------------------------------------------------------------------------------------------------
# Does a memory fit a base model?


def check_memory_matches(memory_config: MemoryConfig, base, tokenizer_fingerprint: str | None = None,
                         layer: int | None = None, memory_path: str | None = None, base_fingerprint: str | None = None,
                         allow_base_mismatch: bool = False) -> dict | None:
    """Raise a `UsageError` if the memory cannot be used beside ``base`` (a model or its config).

    Checked: hidden size (the memory's input is the base's hidden state), vocabulary size (the two
    distributions are mixed token by token), tokenizer fingerprint and key layer (when both sides
    know them) and, given ``base_fingerprint`` (the base's `model_fingerprint` at the memory's layer),
    that the base is the model whose hidden states the memory was trained on: another one of the same
    shape is refused unless ``allow_base_mismatch``. A memory that records no base fingerprint (made before
    they were recorded, or a released checkpoint read from the official layout, `models.official`) is
    accepted with one warning saying which, and its ``matches`` is None. Returns that last check's record
    (`utils.modeling.check_model_fingerprint`), None when no ``base_fingerprint`` is given.
    """
    base_config = getattr(base, "config", base)
    where = f"The memory {memory_path}" if memory_path else "The memory"
    base_name = (memory_config.base_model or {}).get("model_name_or_path")
    trained_for = f" (it was trained for {base_name})" if base_name else ""
    if memory_config.hidden_size != base_config.hidden_size:
        raise UsageError(f"{where} takes hidden states of dimension {memory_config.hidden_size}, but the base model's "
                         f"hidden size is {base_config.hidden_size}{trained_for}")
    if memory_config.vocab_size != base_config.vocab_size:
        raise UsageError(f"{where} predicts over {memory_config.vocab_size} tokens, but the base model's vocabulary "
                         f"has {base_config.vocab_size}{trained_for}")
    if tokenizer_fingerprint and memory_config.tokenizer_fingerprint \
            and tokenizer_fingerprint != memory_config.tokenizer_fingerprint:
        raise UsageError(f"{where} was trained with tokenizer fingerprint {memory_config.tokenizer_fingerprint}, "
                         f"but this base model's tokenizer has {tokenizer_fingerprint}{trained_for}")
    if layer is not None and memory_config.layer is not None and layer != memory_config.layer:
        raise UsageError(f"{where} reads the feed-forward input of block {memory_config.layer}, not block {layer}")
    if base_fingerprint is None:
        return None
    unrecorded = None
    if memory_config.released_layout and memory_config.base_model_fingerprint is None:
        unrecorded = (f"a released {memory_config.released_layout} memory read from the official layout; "
                      "`python -m models.convert --from official --base_model BASE` records one")
    return check_model_fingerprint(base_fingerprint, memory_config.base_model_fingerprint, f"{where}{trained_for}",
                                   f"the base model {getattr(base_config, '_name_or_path', '') or ''}".rstrip(),
                                   allow_base_mismatch, unrecorded)
