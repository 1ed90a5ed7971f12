"""Closed-book QA with the base model alone or base + MLP memory (the paper's QA evaluation).

    python -m downstream.eval_qa --model_name_or_path MODEL --data_file NQ-open.dev.jsonl --output_dir OUT \
        --protocol released [--use_neural_knn --knn_generator_path MEMORY --lmbda 0.5 --knn_temp 1]
    python -m downstream.eval_qa ... --num_shards 4 --shard_index 0 --output_dir OUT/shard0   # ... up to 3, then
    python -m downstream.eval_qa --merge OUT/shard0 OUT/shard1 OUT/shard2 OUT/shard3 --output_dir OUT/all

Zero-shot by default (``--num_fewshot`` examples from ``--fewshot_file``), greedy, batched with left
padding. ``--protocol`` (`downstream.qa_protocols`) fixes the prompt template and how the question is
written in it, the number of new tokens, the stop strings, which part of the continuation is the answer
and the scoring rules: ``released`` (NQ-open, HotpotQA as the released code), ``webqa`` (the authors'
WebQuestions / TriviaQA evaluator) or ``default`` (this project's: the ``qa_prompt`` recorded in the
``meta.json`` beside ``--data_file``, else ``"Answer these questions:\\nQuestion: {question}\\nAnswer:"``;
16 tokens; the first non-blank line). The per-dataset presets ``nq``, ``hotpotqa``, ``webquestions`` and
``triviaqa`` add the memory weight, dtype and batch size the authors ran each with
(`apply_protocol_settings`; flags win), and ``--batch_stop`` runs the WebQuestions / TriviaQA evaluator's
batch rule. ``--prompt_template``, ``--max_new_tokens``, ``--stop`` and ``--stop_at_newline`` override the
protocol's values (a literal ``\\n`` typed on the command line means a newline). Scores
(`downstream.qa_metrics`): exact match, token F1 and "contains a gold answer" after SQuAD normalisation (and
``has_answer`` under ``webqa``), each the max over the gold answers, means x100.

Writes ``OUT/predictions.jsonl`` (one line per question, with its prompt) and ``OUT/qa_results.json`` (also
merged into ``OUT/all_results.json``) with the resolved protocol. Data loading is `downstream.qa_data`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import StoppingCriteriaList

from downstream.qa_data import load_qa, recorded_prompt, select
from downstream.qa_metrics import SCORE_KEYS, aggregate, score
from downstream.qa_protocols import (
    DEFAULT_PROMPT,
    PLACEHOLDER,
    PROTOCOLS,
    Protocol,
    batch_stop_protocol,
    build_prompt,
    choose_shots,
    extract_answer,
    first_line,  # noqa: F401 - part of this module's interface (tests, callers)
    get_protocol,
)
from downstream.stopping import AnswerLineComplete, BatchStopStrings, StopStrings
from utils.arguments import BaseCheckArguments, PretrainedModelArguments
from utils.cli import UsageError, check_finite_floats, command, flags_given, parse_args, setup_logging
from utils.io import read_json, save_metrics
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


@dataclass
class QAArguments:
    output_dir: str = field(metadata={"help": "Directory for predictions.jsonl and qa_results.json."})
    data_file: str | None = field(default=None, metadata={
        "help": "Local QA file: a JSON list, JSON lines (whatever the suffix), or an object with a 'data' or "
                "'examples' list."})
    dataset_name: str | None = field(default=None, metadata={"help": "datasets-hub name, e.g. nq_open or trivia_qa."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config, e.g. rc.nocontext for trivia_qa."})
    dataset_split: str = field(default="validation", metadata={"help": "Hub split to evaluate."})
    question_field: str | None = field(default=None, metadata={"help": "Question field (default: detected)."})
    answer_field: list[str] | None = field(default=None, metadata={
        "help": "Gold answer field(s); several are pooled, e.g. --answer_field answer aliases (default: detected: "
                "answer, answers, possible_answers, right_answer, ..., plus aliases fields when present; a TriviaQA "
                "answer dict gives its value and all its aliases).",
        "nargs": "+"})
    protocol: str = field(default="default", metadata={
        "help": "Evaluation protocol (downstream/qa_protocols.py): 'released' (NQ-open / HotpotQA as the released "
                "eval_qa.py: 'Answer these questions:\\nQuestion: {q}?\\nAnswer:', 15 tokens, first line, F1 with "
                "the yes/no rule, NQ's ')' answers dropped), 'webqa' (the authors' WebQuestions / TriviaQA "
                "evaluator: 'Answer the questions:\\n\\nQuestion: {q}? The answer is:', stop at newline . or "
                ",, 100 tokens, has_answer) or 'default' (this project's). Per dataset, with the authors' run "
                "settings where no flag sets them: 'nq' and 'hotpotqa' (released, lmbda 0.5, float16, batch 1), "
                "'webquestions' (webqa, lmbda 0.75, bfloat16, batch 4), 'triviaqa' (webqa, lmbda 0.6, bfloat16, "
                "batch 4).",
        "choices": list(PROTOCOLS)})
    batch_stop: bool = field(default=False, metadata={
        "help": "The authors' WebQuestions / TriviaQA batch rule (webqa, webquestions, triviaqa): a batch stops only "
                "when every row has produced the same stop string, and the prediction is all the text generated, so "
                "results depend on the batch size (theirs: 4, the webquestions / triviaqa presets' default). "
                "Default: each row stops at its own first stop string.", "nargs": "?", "const": True})
    max_samples: int | None = field(default=None, metadata={
        "help": "Evaluate only N questions (the first N, or N from --start)."})
    start: int = field(default=0, metadata={"help": "Skip the first N questions (with --max_samples: a window)."})
    num_shards: int = field(default=1, metadata={
        "help": "Split the questions into this many contiguous shards and evaluate one (--shard_index); merge the "
                "shards' output directories with --merge."})
    shard_index: int = field(default=0, metadata={"help": "Which shard to evaluate, 0 .. --num_shards - 1."})
    merge: list[str] | None = field(default=None, metadata={
        "help": "Merge the output directories of the shards of one run into --output_dir (no model is loaded): "
                "the metrics equal those of the unsharded run.", "nargs": "+"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "Prompt with a {question} placeholder; overrides the protocol's. Under the default protocol: the "
                "qa_prompt that the meta.json beside --data_file records (the quickstart's corpus does), else "
                "'Answer these questions:\\nQuestion: {question}\\nAnswer:'."})
    num_fewshot: int = field(default=0, metadata={
        "help": "Put N solved examples from --fewshot_file before each question, in the template's format (never "
                "the question itself)."})
    fewshot_file: str | None = field(default=None, metadata={
        "help": "QA file of few-shot examples (same formats and fields as --data_file; the first gold answer is "
                "shown)."})
    fewshot_seed: int = field(default=0, metadata={"help": "Seed of the few-shot choice (deterministic per question)."})
    chat_template: bool = field(default=False, metadata={
        "help": "Send each prompt as a user message through the tokenizer's chat template."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Questions per generate call."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Tokens generated per question at most (default: the protocol's: 16, released 15, webqa 100)."})
    stop: list[str] | None = field(default=None, metadata={
        "help": "Stop strings: a row stops at the first of them and its continuation is cut there (default: the "
                "protocol's: released '\\n', webqa '\\n' '.' ','; a typed \\n is a newline).", "nargs": "+"})
    stop_at_newline: bool | None = field(default=None, metadata={
        "help": "Stop a row once its answer line is complete (a newline after its first non-blank character); "
                "default: on under the default protocol.", "nargs": "?", "const": True})
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
        get_protocol(self.protocol)
        if self.prompt_template is not None:
            self.prompt_template = self.prompt_template.replace("\\n", "\n")
            if PLACEHOLDER not in self.prompt_template:
                raise UsageError(f"--prompt_template must contain {PLACEHOLDER}, got {self.prompt_template!r}")
        if self.stop is not None:
            self.stop = [s.replace("\\n", "\n") for s in self.stop]
            if not all(self.stop):
                raise UsageError("--stop strings must not be empty")
        for flag in ("max_samples", "per_device_eval_batch_size", "max_new_tokens", "num_shards"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag} must be >= 1, got {value}")
        for flag in ("start", "num_fewshot", "shard_index"):
            if getattr(self, flag) < 0:
                raise UsageError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if self.shard_index >= self.num_shards:
            raise UsageError(f"--shard_index must be below --num_shards ({self.num_shards}), got {self.shard_index}")
        if self.num_fewshot and not self.fewshot_file:
            raise UsageError("--num_fewshot needs --fewshot_file (a QA file of solved examples)")
        if self.fewshot_file and not self.num_fewshot:
            raise UsageError("--fewshot_file is only used with --num_fewshot N (N >= 1)")
        if self.use_neural_knn and not self.knn_generator_path:
            raise UsageError("--use_neural_knn needs --knn_generator_path (an MLP memory directory)")
        if self.knn_generator_path and not self.use_neural_knn:
            raise UsageError("--knn_generator_path is only used with --use_neural_knn; add it or drop the path")
        from models.joint import check_joint_settings

        check_joint_settings(0.5 if self.lmbda is None else self.lmbda, 1.0 if self.knn_temp is None else self.knn_temp)


def resolve_prompt(args: QAArguments) -> tuple[str, str]:
    """The prompt template and where it came from: --prompt_template, the protocol's template, or (default
    protocol) the ``qa_prompt`` of the ``meta.json`` beside --data_file (a QA set that brings its own prompt),
    else the released template."""
    if args.prompt_template is not None:
        return args.prompt_template, "--prompt_template"
    protocol = get_protocol(args.protocol)
    if protocol.template is not None:
        return protocol.template, f"--protocol {protocol.name}"
    return (args.data_file and recorded_prompt(args.data_file)) or (DEFAULT_PROMPT, "the released default")


def resolve_protocol(args: QAArguments) -> tuple[Protocol, str]:
    """The protocol of --protocol with its template resolved (`resolve_prompt`) and the values that flags set, and
    where the template came from."""
    template, template_source = resolve_prompt(args)
    protocol = get_protocol(args.protocol).override(max_new_tokens=args.max_new_tokens, stop=args.stop,
                                                    stop_at_newline=args.stop_at_newline,
                                                    template=args.prompt_template)
    if args.batch_stop:
        protocol = batch_stop_protocol(protocol)
    return replace(protocol, template=template), template_source


def make_prompt(template: str, question: str) -> str:
    """``template`` with ``question`` in place of ``{question}``, after removing any ``Question:`` / ``Answer:``
    labels the question already carries (the default protocol's prompt)."""
    return build_prompt(template, question)


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
                     stop_at_newline: bool = True, joint=None, stop: Sequence[str] = (),
                     add_special_tokens: bool = True, batch_stop: bool = False) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt, ``batch_size`` at a time; a row stops
    at any of ``stop`` and, with ``stop_at_newline``, once its answer line is complete (the continuations are
    returned as generated, not cut). With ``batch_stop`` the batch stops together (`BatchStopStrings`)."""
    device = next(model.parameters()).device
    generate = joint.generate if joint is not None else model.generate
    continuations = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=add_special_tokens).to(device)
        width = batch["input_ids"].shape[1]
        criteria = [AnswerLineComplete(tokenizer, width)] if stop_at_newline else []
        criteria += [(BatchStopStrings if batch_stop else StopStrings)(tokenizer, width, stop)] if stop else []
        out = generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                       stopping_criteria=StoppingCriteriaList(criteria) if criteria else None)
        continuations += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        logger.info("Answered %d/%d questions", len(continuations), len(prompts))
    return continuations


def apply_chat_template(tokenizer, prompts: list[str], model_flag: str) -> list[str]:
    """Each prompt as the one user message of a chat, through the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--chat_template: the tokenizer of {model_flag} has no chat template (drop the flag, or "
                         "use --tokenizer_name with a chat tokenizer)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write JSON lines atomically (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_questions(args: QAArguments, protocol: Protocol) -> tuple[list[dict], dict, dict]:
    """The questions this run evaluates (after the protocol's drops, --start / --max_samples and the shard), what
    was read, and where the questions lie (`downstream.qa_data.select`)."""
    count = None if args.max_samples is None else args.start + args.max_samples  # read no further than needed
    examples, data_info = load_qa(args.data_file, args.dataset_name, args.dataset_config_name, args.dataset_split,
                                  args.question_field, args.answer_field, count, drop_golds=protocol.drop_golds)
    examples, where = select(examples, args.start, args.max_samples, args.num_shards, args.shard_index)
    return examples, data_info, where


def make_prompts(examples: list[dict], protocol: Protocol, args: QAArguments) -> list[str]:
    """The protocol's prompt of each question, with --num_fewshot examples from --fewshot_file."""
    if not args.num_fewshot:
        return [build_prompt(protocol.template, ex["question"], protocol.question_style) for ex in examples]
    pool, _ = load_qa(args.fewshot_file, question_field=args.question_field, answer_field=args.answer_field,
                      flag="--fewshot_file")
    return [build_prompt(protocol.template, ex["question"], protocol.question_style,
                         choose_shots(pool, ex["question"], args.num_fewshot, args.fewshot_seed)) for ex in examples]


# ---- the authors' run settings of a preset: merge point with the memory settings group ------------------------

def apply_protocol_settings(protocol: Protocol, args: QAArguments, model_args: PretrainedModelArguments,
                            given: set[str]) -> dict:
    """Give ``--lmbda``, ``--torch_dtype`` and ``--per_device_eval_batch_size`` the protocol's values (the authors' for
    that dataset) where no flag in ``given`` set them; returns the values applied."""
    applied = {}
    if protocol.lmbda is not None and args.lmbda is None and "lmbda" not in given:
        args.lmbda = applied["lmbda"] = protocol.lmbda
    if protocol.torch_dtype is not None and "torch_dtype" not in given:
        model_args.torch_dtype = applied["torch_dtype"] = protocol.torch_dtype
    if protocol.batch_size is not None and "per_device_eval_batch_size" not in given:
        args.per_device_eval_batch_size = applied["per_device_eval_batch_size"] = protocol.batch_size
    if applied:
        logger.info("--protocol %s: the authors' settings %s (flags override them)", protocol.name,
                    ", ".join(f"--{k} {v}" for k, v in applied.items()))
    return applied


def answer_questions(model_args: PretrainedModelArguments, args: QAArguments, checks: BaseCheckArguments,
                     given: set[str] = frozenset()) -> dict:
    """Answer, score and write the results, holding the lock of --output_dir; ``given``: the flags typed."""
    protocol, template_source = resolve_protocol(args)
    logger.info("Protocol %s (%s); prompt from %s; settings %s", protocol.name, protocol.source, template_source,
                json.dumps(protocol.describe()))
    applied = apply_protocol_settings(protocol, args, model_args, given)
    examples, data_info, where = read_questions(args, protocol)
    if args.num_shards > 1 or args.start or args.max_samples:
        logger.info("Questions %d to %d (shard %d of %d)", where["start"], where["end"] - 1, args.shard_index,
                    args.num_shards)
    tok_path, tok_gguf = model_tokenizer_path(model_args)
    model_flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    tokenizer = load_tokenizer(tok_path, tok_gguf, model_flag)
    prompts = make_prompts(examples, protocol, args)
    if args.chat_template:
        prompts = apply_chat_template(tokenizer, prompts, model_flag)
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

    start = time.perf_counter()
    continuations = generate_answers(model, tokenizer, prompts, args.per_device_eval_batch_size,
                                     protocol.max_new_tokens, protocol.stop_at_newline, joint, protocol.stop,
                                     add_special_tokens=protocol.add_special_tokens and not args.chat_template,
                                     batch_stop=protocol.batch_stop)  # the chat template has its own special tokens
    seconds = time.perf_counter() - start

    rows, scores = [], []
    for ex, prompt, continuation in zip(examples, prompts, continuations):
        prediction = extract_answer(continuation, protocol)
        s = score(prediction, ex["golds"], protocol.scoring)
        scores.append(s)
        rows.append({"question": ex["question"], "prompt": prompt, "golds": ex["golds"], "prediction": prediction,
                     "continuation": continuation, **s})
    metrics = {
        **aggregate(scores),
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
        "questions": where,
        "protocol": protocol.describe(),
        "protocol_settings_applied": applied, "torch_dtype": model_args.torch_dtype,
        "prompt_template": protocol.template, "prompt_source": template_source,
        "settings": {k: v for k, v in asdict(args).items() if k not in ("output_dir", "merge")},
        "device": str(next(model.parameters()).device),
    }
    write_results(args.output_dir, rows, metrics)
    return metrics


def write_results(output_dir: str, rows: list[dict], metrics: dict) -> None:
    """``predictions.jsonl``, ``qa_results.json`` (merged into ``all_results.json``) and the summary line."""
    os.makedirs(output_dir, exist_ok=True)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    save_metrics(output_dir, "qa", metrics)
    setting = (f"base + memory (lmbda {metrics['lmbda']:g}, knn_temp {metrics['knn_temp']:g})"
               if metrics["use_neural_knn"] else "base model alone")
    extra = f" has_answer {metrics['has_answer']:.2f}" if "has_answer" in metrics else ""
    logger.info("QA %s (%s protocol), %s: %d questions, EM %.2f F1 %.2f contains %.2f%s, %.2f questions/s (%.1f s)",
                metrics["data"]["source"], metrics["protocol"]["name"], setting, metrics["count"],
                metrics["exact_match"], metrics["f1"], metrics["contains"], extra,
                metrics["questions_per_second"] or 0.0, metrics["seconds"])


# Results that differ between the shards of one run; everything else must agree for them to merge.
PER_SHARD = {"count", *SCORE_KEYS.values(), "seconds", "questions_per_second", "questions", "device"}


def merge_shards(directories: list[str], output_dir: str) -> dict:
    """One result from the output directories of the shards 0..K-1 of one run: the predictions in order and the
    metrics recomputed from them, which equal those of the unsharded run."""
    shards = []
    for directory in directories:
        results_file = os.path.join(directory, "qa_results.json")
        if not os.path.isfile(results_file):
            raise UsageError(f"--merge {directory}: no qa_results.json (run downstream.eval_qa there first)")
        metrics = read_json(results_file)
        if "questions" not in metrics:
            raise UsageError(f"--merge {directory}: written before sharding existed; run it again")
        with open(os.path.join(directory, "predictions.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != metrics["count"]:
            raise UsageError(f"--merge {directory}: predictions.jsonl has {len(rows)} rows, qa_results.json counts "
                             f"{metrics['count']}")
        shards.append((metrics, rows, directory))
    shards.sort(key=lambda shard: shard[0]["questions"]["shard_index"])
    first = shards[0][0]

    def common(metrics: dict) -> dict:
        settings = {k: v for k, v in metrics["settings"].items() if k != "shard_index"}
        return {**{k: v for k, v in metrics.items() if k not in PER_SHARD}, "settings": settings}

    for metrics, _, directory in shards[1:]:
        differing = sorted(k for k in {**common(first), **common(metrics)}
                           if common(first).get(k) != common(metrics).get(k))
        if differing:
            raise UsageError(f"--merge {directory}: not a shard of the same run as {shards[0][2]} (differs in "
                             f"{', '.join(differing)})")
    num_shards = first["questions"]["num_shards"]
    indices = [metrics["questions"]["shard_index"] for metrics, _, _ in shards]
    if indices != list(range(num_shards)):
        raise UsageError(f"--merge: expected the shards 0..{num_shards - 1} of --num_shards {num_shards} once each, "
                         f"got {indices}")
    rows = [row for _, shard_rows, _ in shards for row in shard_rows]
    seconds = sum(metrics["seconds"] for metrics, _, _ in shards)
    merged = {
        **{k: v for k, v in first.items() if k not in PER_SHARD},
        **aggregate([{k: row[k] for k in SCORE_KEYS if k in row} for row in rows]),
        "seconds": seconds, "questions_per_second": len(rows) / seconds if seconds > 0 else None,
        "questions": {"start": first["questions"]["start"], "end": shards[-1][0]["questions"]["end"],
                      "num_shards": num_shards, "shard_index": None},
        "device": sorted({metrics["device"] for metrics, _, _ in shards}),
        "merged_from": [os.path.abspath(directory) for _, _, directory in shards],
    }
    write_results(output_dir, rows, merged)
    return merged


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if "--merge" in argv:  # no model: only the QA flags
        (args,) = parse_args((QAArguments,), argv)
        with artifact_lock(args.output_dir, "--output_dir"):
            return merge_shards(args.merge, args.output_dir)
    model_args, args, checks = parse_args((PretrainedModelArguments, QAArguments, BaseCheckArguments), argv)
    if model_args.model_name_or_path is None:
        raise UsageError("--model_name_or_path is required (a pretrained base model)")
    with artifact_lock(args.output_dir, "--output_dir"):
        return answer_questions(model_args, args, checks, flags_given(argv))


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
