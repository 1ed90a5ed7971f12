"""Closed-book QA with the base model alone or base + MLP memory (the paper's QA evaluation).

    python -m downstream.eval_qa --model_name_or_path MODEL --data_file NQ-open.dev.jsonl --output_dir OUT
    python -m downstream.eval_qa ... --use_neural_knn --knn_generator_path MEMORY --lmbda 0.5 --knn_temp 1

Zero-shot, greedy, batched with left padding. The prompt is ``--prompt_template`` with ``{question}``
replaced (a literal ``\\n`` typed on the command line means a newline). By default it is the
``qa_prompt`` recorded in the ``meta.json`` beside ``--data_file`` (the quickstart's corpus records the
form of its training QA lines), else the released ``"Answer these questions:\\nQuestion: {question}\\nAnswer:"``.
The answer is the first line of the continuation once leading whitespace is stripped; generation of a
row stops at the newline that ends that line (``--stop_at_newline``, on by default: the answer is the
same, only faster).
Scores (`downstream.qa_metrics`): exact match, token F1 and "contains a gold answer" after SQuAD
normalisation, each the max over the gold answers, means x100.

Writes ``OUT/predictions.jsonl`` (one line per question) and ``OUT/qa_results.json`` (also merged into
``OUT/all_results.json``). Data loading is `downstream.qa_data`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from downstream.qa_data import load_qa, recorded_prompt
from downstream.qa_metrics import aggregate, score
from utils.arguments import BaseCheckArguments, PretrainedModelArguments
from utils.cli import UsageError, check_finite_floats, command, parse_args, setup_logging
from utils.io import save_metrics
from utils.locking import artifact_lock
from utils.modeling import (
    describe_model,
    load_causal_lm,
    load_tokenizer,
    local_path_or_name,
    model_tokenizer_path,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Answer these questions:\nQuestion: {question}\nAnswer:"
PLACEHOLDER = "{question}"


@dataclass
class QAArguments:
    output_dir: str = field(metadata={"help": "Directory for predictions.jsonl and qa_results.json."})
    data_file: str | None = field(default=None, metadata={"help": "Local .json (list of records) or .jsonl QA file."})
    dataset_name: str | None = field(default=None, metadata={"help": "datasets-hub name, e.g. nq_open or trivia_qa."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config, e.g. rc.nocontext for trivia_qa."})
    dataset_split: str = field(default="validation", metadata={"help": "Hub split to evaluate."})
    question_field: str | None = field(default=None, metadata={"help": "Question field (default: detected)."})
    answer_field: list[str] | None = field(default=None, metadata={
        "help": "Gold answer field(s); several are pooled, e.g. --answer_field answer aliases (default: detected: "
                "answer, answers, possible_answers, right_answer, ..., plus aliases fields when present).",
        "nargs": "+"})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N questions."})
    prompt_template: str | None = field(default=None, metadata={
        "help": "Prompt with a {question} placeholder. Default: the qa_prompt that the meta.json beside --data_file "
                "records (the quickstart's corpus does), else the released "
                "'Answer these questions:\\nQuestion: {question}\\nAnswer:'."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Questions per generate call."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per question at most."})
    stop_at_newline: bool = field(default=True, metadata={"help": "Stop a row once its answer line is complete."})
    use_neural_knn: bool = field(default=False, metadata={
        "help": "Interpolate the base model with the memory (implied when --model_name_or_path is a joint model)."})
    knn_generator_path: str | None = field(default=None, metadata={
        "help": "Memory directory (with --use_neural_knn): an MLP memory or a Memory Decoder."})
    lmbda: float | None = field(default=None, metadata={
        "help": "Weight of the memory in the interpolation (default: a joint model's own, else 0.5)."})
    knn_temp: float | None = field(default=None, metadata={
        "help": "Temperature of the memory's logits (default: a joint model's own, else 1)."})

    def __post_init__(self):
        check_finite_floats(self)
        if self.prompt_template is not None:
            self.prompt_template = self.prompt_template.replace("\\n", "\n")
            if PLACEHOLDER not in self.prompt_template:
                raise UsageError(f"--prompt_template must contain {PLACEHOLDER}, got {self.prompt_template!r}")
        for flag in ("max_samples", "per_device_eval_batch_size", "max_new_tokens"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag} must be >= 1, got {value}")
        if self.use_neural_knn and not self.knn_generator_path:
            raise UsageError("--use_neural_knn needs --knn_generator_path (an MLP memory directory)")
        if self.knn_generator_path and not self.use_neural_knn:
            raise UsageError("--knn_generator_path is only used with --use_neural_knn; add it or drop the path")
        from models.joint import check_joint_settings

        check_joint_settings(0.5 if self.lmbda is None else self.lmbda, 1.0 if self.knn_temp is None else self.knn_temp)


def resolve_prompt(args: QAArguments) -> tuple[str, str]:
    """The prompt template and where it came from: --prompt_template, the ``qa_prompt`` of the ``meta.json``
    beside --data_file (a QA set that brings its own prompt), or the released default."""
    if args.prompt_template is not None:
        return args.prompt_template, "--prompt_template"
    return (args.data_file and recorded_prompt(args.data_file)) or (DEFAULT_PROMPT, "the released default")


# A question field that already holds "Question: ... Answer:" (TriviaQA's released subset) is unwrapped first,
# so that the template does not add its labels twice.
_QUESTION_LABEL = re.compile(r"^\s*(?:question|q)\s*:\s*", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"\s*(?:answer|a)\s*:\s*$", re.IGNORECASE)


def make_prompt(template: str, question: str) -> str:
    """``template`` with ``question`` in place of ``{question}``, after removing any ``Question:`` / ``Answer:``
    labels the question already carries."""
    if _QUESTION_LABEL.match(question):
        question = _ANSWER_LABEL.sub("", _QUESTION_LABEL.sub("", question, count=1))
    return template.replace(PLACEHOLDER, question)


def first_line(continuation: str) -> str:
    """The answer: the first line of the continuation, leading whitespace (newlines included) skipped."""
    return continuation.strip().split("\n", 1)[0].strip()


class AnswerLineComplete(StoppingCriteria):
    """Per row: stop once the generated text has a newline after its first non-blank character."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


def prepare_tokenizer(tokenizer, model) -> None:
    """Left padding with a pad token (the EOS one if there is none); the model's generation config agrees."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("The tokenizer has neither a pad nor an EOS token: batched generation needs one")
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                     stop_at_newline: bool = True, joint=None) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt, ``batch_size`` at a time."""
    device = next(model.parameters()).device
    generate = joint.generate if joint is not None else model.generate
    continuations = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        width = batch["input_ids"].shape[1]
        stopping = StoppingCriteriaList([AnswerLineComplete(tokenizer, width)]) if stop_at_newline else None
        out = generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                       stopping_criteria=stopping)
        continuations += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        logger.info("Answered %d/%d questions", len(continuations), len(prompts))
    return continuations


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write JSON lines atomically (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def answer_questions(model_args: PretrainedModelArguments, args: QAArguments, checks: BaseCheckArguments) -> dict:
    """Answer, score and write the results, holding the lock of --output_dir."""
    examples, data_info = load_qa(args.data_file, args.dataset_name, args.dataset_config_name, args.dataset_split,
                                  args.question_field, args.answer_field, args.max_samples)
    tok_path, tok_gguf = model_tokenizer_path(model_args)
    tokenizer = load_tokenizer(tok_path, tok_gguf, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    from models.joint import JointLM
    from models.joint.causal_lm import load_base_and_memory

    loaded = load_base_and_memory(model_args, args.knn_generator_path, lambda: load_causal_lm(model_args), args.lmbda,
                                  args.knn_temp, tokenizer_fingerprint(tokenizer), checks.allow_base_mismatch,
                                  default_lmbda=0.5)  # --model_name_or_path may be a joint model (base + memory)
    args.lmbda, args.knn_temp = loaded.lmbda, loaded.knn_temp
    model = loaded.model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    prepare_tokenizer(tokenizer, model)

    joint = None
    if loaded.memory is not None:
        args.use_neural_knn, args.knn_generator_path = True, loaded.memory_path
        joint = JointLM(model, loaded.memory, lmbda=args.lmbda, knn_temp=args.knn_temp,
                        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                        allow_base_mismatch=checks.allow_base_mismatch)

    template, template_source = resolve_prompt(args)
    logger.info("Prompt %r (from %s)", template, template_source)
    prompts = [make_prompt(template, ex["question"]) for ex in examples]
    start = time.perf_counter()
    continuations = generate_answers(model, tokenizer, prompts, args.per_device_eval_batch_size, args.max_new_tokens,
                                     args.stop_at_newline, joint)
    seconds = time.perf_counter() - start

    rows, scores = [], []
    for ex, prompt, continuation in zip(examples, prompts, continuations):
        prediction = first_line(continuation)
        s = score(prediction, ex["golds"])
        scores.append(s)
        rows.append({"question": ex["question"], "prompt": prompt, "golds": ex["golds"], "prediction": prediction,
                     "continuation": continuation, **s})
    summary = aggregate(scores)
    metrics = {
        **summary,
        "seconds": seconds,
        "questions_per_second": len(examples) / seconds if seconds > 0 else None,
        "use_neural_knn": args.use_neural_knn,
        "knn_generator_path": local_path_or_name(args.knn_generator_path),
        "lmbda": args.lmbda if args.use_neural_knn else None,
        "knn_temp": args.knn_temp if args.use_neural_knn else None,
        "base_check": joint.base_check if joint is not None else None,
        "model": describe_model(model_args),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data": data_info,
        "prompt_template": template, "prompt_source": template_source,
        "settings": {k: v for k, v in asdict(args).items() if k not in ("output_dir",)},
        "device": str(next(model.parameters()).device),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "predictions.jsonl"), rows)
    save_metrics(args.output_dir, "qa", metrics)
    setting = (f"base + memory (lmbda {args.lmbda:g}, knn_temp {args.knn_temp:g})" if args.use_neural_knn
               else "base model alone")
    logger.info("QA %s, %s: %d questions, EM %.2f F1 %.2f contains %.2f, %.2f questions/s (%.1f s)",
                data_info["source"], setting, summary["count"], summary["exact_match"], summary["f1"],
                summary["contains"], metrics["questions_per_second"] or 0.0, seconds)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    model_args, args, checks = parse_args((PretrainedModelArguments, QAArguments, BaseCheckArguments), argv)
    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required (a pretrained base model)")
    with artifact_lock(args.output_dir, "--output_dir"):
        return answer_questions(model_args, args, checks)


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
