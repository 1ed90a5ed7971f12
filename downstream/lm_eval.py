"""Any lm-evaluation-harness task on base + MLP memory: the joint model registered with lm-eval as ``mlp_memory``.

    python -m downstream.lm_eval --model_args base=MODEL,memory=MEMORY,lmbda=0.5 --tasks arc_easy \\
        --output_path OUT [any other lm-eval flag: --num_fewshot, --limit, --log_samples, --include_path, ...]

The command is lm-eval's own CLI (``lm-eval run``) with ``--model mlp_memory`` filled in; the model class
is registered by importing this module. Model arguments (``--model_args key=value,...``):

    base                 hub name or local directory of the base model (required), or a joint model directory
                         (python -m models.convert --joint), which brings its memory, lmbda and memory_temp
    memory               the memory (an MLP memory, a released one, a Memory Decoder); leave it out to evaluate
                         the base model alone
    lmbda                the memory's weight in [0, 1] (default: the joint directory's, else 0.5, the default
                         of models/joint/settings.py for generation, QA and judgments)
    memory_temp          temperature of the memory's logits (default: the joint directory's, else 1);
                         knn_temp is its released name
    gguf_file            GGUF file inside ``base`` (dequantised to float on load)
    tokenizer            tokenizer directory or hub name, if not the base model's own
    dtype                float32 (default), bfloat16 or float16
    allow_base_mismatch  accept a base model other than the one the memory was trained on
    pretrained           the name lm-eval files the results under (default: BASE+MEMORY, see `results_name`)
    batch_size, device, max_length, add_bos_token, ...   as for lm-eval's ``hf`` model

They are parsed into the one settings group of a memory in use (`models.joint.settings.MemoryArguments`) and
the base and memory are loaded by the one loader (`models.joint.loading.load_joint`).

`MLPMemoryLM` subclasses lm-eval's `HFLM` and changes only where logits come from: the base model and the
memory come from `load_joint` (GGUF, a joint directory, any memory), checked against each other, and every
forward of HFLM (``_model_call``: ``loglikelihood``,
``loglikelihood_rolling``) and every ``generate`` (``_model_generate``: ``generate_until``) runs with the memory
attached by hooks (`models.joint.attach_memory`). The attached model's "logits" are the joint
log-probabilities, already normalised, so HFLM's ``log_softmax`` of them gives them back (to float32 rounding)
and its sampling and greedy decoding draw from the joint distribution. Subclassing keeps lm-eval's request
handling (batching, context truncation, rolling windows, the one-token logits cache, stop sequences, chat
templates) as lm-eval defines it, instead of a second copy of it here.

Single process (no ``accelerate launch`` data parallelism): HFLM does not distribute a model it is handed.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from models.joint.loading import load_joint
from models.joint.settings import DOWNSTREAM, MemoryArguments
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, command
from utils.modeling import local_path_or_name

logger = logging.getLogger(__name__)

MODEL_NAME = "mlp_memory"
DTYPES = ("float32", "bfloat16", "float16")
# HFLM's arguments that still apply to a model handed to it already loaded (the others load or place a model).
HFLM_ARGUMENTS = ("batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "add_bos_token",
                  "prefix_token_id", "softmax_dtype", "mixed_precision_dtype", "think_end_token", "enable_thinking",
                  "chat_template_args")
OWN_ARGUMENTS = ("base", "memory", "lmbda", "memory_temp", "knn_temp", "gguf_file", "tokenizer", "dtype",
                 "allow_base_mismatch", "device", "pretrained")


def model_arg_error(message: str) -> UsageError:
    return UsageError(f"--model_args: {message}")


def resolve_device(device: str | None) -> torch.device:
    """``device`` (lm-eval's CLI passes ``cuda:0`` by default), or the CPU when no GPU is there."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise model_arg_error(f"device={device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None


def results_name(arg_dict: dict) -> str:
    """The name lm-eval files results under: ``BASE+MEMORY`` as given (BASE alone without a memory). lm-eval takes it
    from a ``pretrained`` model argument (else it draws a random one), so `MLPMemoryLM.create_from_arg_obj` sets
    ``pretrained`` to this unless it is given."""
    base, memory = arg_dict.get("base"), arg_dict.get("memory")
    return f"{base}+{memory}" if memory else str(base)


@register_model(MODEL_NAME)
class MLPMemoryLM(HFLM):
    """lm-eval's Hugging Face model with a memory attached: every request scored by the joint model."""

    def __init__(self, base: str | None = None, memory: str | None = None, lmbda: float | None = None,
                 memory_temp: float | None = None, knn_temp: float | None = None, gguf_file: str | None = None,
                 tokenizer: str | None = None, dtype: str = "float32", allow_base_mismatch: bool = False,
                 device: str | None = None, pretrained: str | None = None, **hflm_kwargs):
        unknown = sorted(set(hflm_kwargs) - set(HFLM_ARGUMENTS))
        if unknown:
            raise model_arg_error(f"unknown model argument(s) {', '.join(unknown)}; {MODEL_NAME} takes "
                                  f"{', '.join(OWN_ARGUMENTS + HFLM_ARGUMENTS)}")
        if not base:
            raise model_arg_error(f"{MODEL_NAME} needs base=MODEL (a hub name, a local directory or a joint directory)")
        if dtype not in DTYPES:
            raise model_arg_error(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not isinstance(allow_base_mismatch, bool):
            raise model_arg_error(f"allow_base_mismatch must be true or false, got {allow_base_mismatch!r}")
        if memory_temp is not None and knn_temp is not None:
            raise model_arg_error("give memory_temp or knn_temp (its released name), not both")
        temperature = memory_temp if memory_temp is not None else knn_temp
        try:
            memory_args = MemoryArguments(memory=str(memory) if memory else None,
                                          allow_base_mismatch=allow_base_mismatch,
                                          lmbda=None if lmbda is None else [float(lmbda)],
                                          memory_temp=None if temperature is None else float(temperature))
            model_args = PretrainedModelArguments(model_name_or_path=str(base), gguf_file=gguf_file,
                                                  tokenizer_name=tokenizer, torch_dtype=dtype)
            loaded = load_joint(model_args, memory_args, DOWNSTREAM)
        except UsageError as err:
            raise model_arg_error(str(err)) from None
        model = loaded.model.to(resolve_device(device))
        self.joint = loaded.joint() if loaded.memory is not None else None
        record = loaded.record
        self.record = {"base": local_path_or_name(str(base)), "gguf_file": gguf_file, "memory": record["memory"],
                       "memory_kind": record["memory_kind"], "lmbda": loaded.lmbda,
                       "lmbda_source": record["lmbda_source"], "memory_temp": loaded.memory_temp,
                       "memory_temp_source": record["memory_temp_source"], "base_check": record["base_check"],
                       "tokenizer_fingerprint": record["tokenizer_fingerprint"], "results_name": pretrained}
        logger.info("lm-eval model %s: %s", MODEL_NAME, self.record)
        super().__init__(pretrained=model, tokenizer=loaded.tokenizer, backend="causal", **hflm_kwargs)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor from ``--model_args``; ``pretrained`` (the name lm-eval files the results under, read
        from this same dict) is set to `results_name` unless given."""
        arg_dict.setdefault("pretrained", results_name(arg_dict))
        return super().create_from_arg_obj(arg_dict, additional_config)

    def _model_call(self, inps, attn_mask=None, labels=None):
        """HFLM's forward; with a memory, the joint log-probabilities (B, T, V) stand in for its logits."""
        if self.joint is None:
            return super()._model_call(inps, attn_mask, labels)
        with self.joint.attached():
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """HFLM's ``generate`` (its stop sequences and generation settings), decoding from the joint model."""
        if self.joint is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        with self.joint.attached():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        """What results record about the model: sizes and dtype, and the joint settings (no hub look-up)."""
        return {"model_num_parameters": self._model.num_parameters(), "model_dtype": str(self._model.dtype),
                "torch_threads": torch.get_num_threads(), MODEL_NAME: self.record}  # beside lm-eval's timing


def lm_eval_argv(argv: list[str]) -> list[str]:
    """``argv`` as lm-eval's CLI reads it: the ``run`` command, and ``--model mlp_memory`` unless a model is named."""
    if argv and argv[0] in ("run", "ls", "validate"):
        command, argv = argv[0], argv[1:]
    else:
        command = "run"
    if command == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv = ["--model", MODEL_NAME, *argv]
    return [command, *argv]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (``lm-eval run``) with the ``mlp_memory`` model registered; it writes its own results."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    saved = sys.argv
    sys.argv = ["lm-eval", *lm_eval_argv(list(argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
