"""The joint model (base + MLP memory) as a vLLM model: one forward, the base's KV cache, mixing in compute_logits.

vLLM builds `MLPMemoryJointForCausalLM` for a joint directory (``architectures: ["MLPMemoryForCausalLM"]``, the
plugin in `models.serving` registers it). It holds

* ``base``: vLLM's own model of the base family (``text_config``), built by vLLM, with vLLM's attention, batching
  and paged KV cache; it is not modified. Only the ``forward`` of its key module (the feed-forward layer of block
  ``memory_layer``, named by `utils.architectures`) is wrapped to copy its input (the memory's input, the same
  hidden state as `utils.hidden_state.HiddenStateHook` captures in HF) into a buffer of that module: a copy into a
  fixed buffer, so the forward stays traceable by torch.compile and replayable in CUDA graphs;
* ``memory``: the MLP memory network of `models.modeling_mlp_memory` (no attention, no cache).

``forward`` returns the base's final hidden states widened with the memory's input, (T, 2d): vLLM selects the rows
it needs logits for (the last token of each request, or every prompt token for ``prompt_logprobs``) from that one
tensor, so both halves stay aligned. ``compute_logits`` splits them, runs the base's head (soft-capping and all)
and the memory on those rows only, and returns the joint log-probabilities (float32)

    log p = logaddexp(log_softmax(base_logits) + log(1 - lmbda), log_softmax(memory(h) / T) + log(lmbda))

with `models.joint.interpolation.interpolate_log_probs`, the formula of every other path. They are normalised, so
vLLM's sampling (temperature, top-p, ...), log-probs, prompt log-probs and stop strings all see the joint
distribution. ``lmbda`` 0 returns the base's log-softmax and runs no memory. Pipeline parallelism is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix

from models.joint.interpolation import interpolate_log_probs, memory_log_probs
from models.modeling_mlp_memory import MEMORY_MODELS
from models.serving.checks import serving_settings
from utils.architectures import arch_spec, submodule
from utils.cli import UsageError

logger = logging.getLogger(__name__)


TAP = "memory_input"  # the buffer of the key module that receives its input


def tap_input(module: nn.Module, rows: int, width: int, dtype: torch.dtype) -> None:
    """Give ``module`` a buffer ``memory_input`` (rows, width), not saved, and wrap its ``forward`` (on the instance:
    parameter names do not change) so that it first copies its input (T, width) into ``memory_input[:T]``. The
    buffer belongs to the module, so it moves with it (``.to()``) and the wrapper always finds the current one."""
    module.register_buffer(TAP, torch.zeros(rows, width, dtype=dtype), persistent=False)
    forward = module.forward

    def forward_and_copy(x: torch.Tensor, *args, **kwargs):
        getattr(module, TAP)[: x.shape[0]].copy_(x)
        return forward(x, *args, **kwargs)

    module.forward = forward_and_copy


class MLPMemoryJointForCausalLM(nn.Module):
    """vLLM's base model of the joint config's family, and the MLP memory reading its key layer."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.settings = serving_settings(config)
        if get_pp_group().world_size > 1:
            raise UsageError("The joint model does not support pipeline parallelism (--pipeline-parallel-size 1)")
        text_config = config.text_config
        self.hidden_size = text_config.hidden_size
        self.base = init_vllm_registered_model(vllm_config, hf_config=text_config, prefix=maybe_prefix(prefix, "base"))
        memory_class = MEMORY_MODELS[config.memory_config.memory_style]
        self.memory = memory_class(config.memory_config).to(dtype=vllm_config.model_config.dtype).eval()
        spec = arch_spec(text_config.model_type)
        blocks = submodule(self.base, spec.layers)
        rows = max(vllm_config.scheduler_config.max_num_batched_tokens,
                   max(vllm_config.compilation_config.cudagraph_capture_sizes or [0]))
        self.key_module = (getattr(blocks[self.settings.memory_layer], spec.ffn),)  # a tuple: not a second parent
        tap_input(self.key_module[0], rows, self.hidden_size, vllm_config.model_config.dtype)
        logger.info("Joint model: %s base, %s memory reading block %d, lmbda %g, memory temperature %g",
                    text_config.model_type, config.memory_config.memory_style, self.settings.memory_layer,
                    self.settings.lmbda, self.settings.memory_temp)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The base's final hidden states and the memory's input side by side, (T, 2d)."""
        hidden = self.base(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # (T, d)
        keys = getattr(self.key_module[0], TAP)[: hidden.shape[0]]  # (T, d), written during the base's forward
        return torch.cat([hidden, keys.to(hidden.dtype)], dim=-1)  # (T, 2d)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Joint log-probabilities (n, V) in float32 for the rows vLLM selected, (n, 2d) -> (n, V)."""
        hidden, keys = hidden_states.split(self.hidden_size, dim=-1)  # (n, d) each
        logits = self.base.compute_logits(hidden.contiguous())  # (n, V)
        if logits is None:  # not the rank that holds the logits
            return None
        lm_log_probs = torch.log_softmax(logits.float(), dim=-1)
        if self.settings.lmbda == 0:
            return lm_log_probs
        return interpolate_log_probs(lm_log_probs, memory_log_probs(self.memory, keys, self.settings.memory_temp),
                                     self.settings.lmbda)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """``base.*`` through the base model's own loader (its stacked projections, tied head), ``memory.*`` here."""
        memory_params = dict(self.memory.named_parameters())
        loaded: set[str] = set()

        def base_weights():
            for name, tensor in weights:
                part, _, rest = name.partition(".")
                if part == "base":
                    yield rest, tensor
                elif part == "memory" and rest in memory_params:
                    param = memory_params[rest]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(name)
                else:
                    raise UsageError(f"Unexpected weight {name} in the joint checkpoint (expected base.* and memory.*)")

        loaded |= {f"base.{name}" for name in self.base.load_weights(base_weights())}
        return loaded
