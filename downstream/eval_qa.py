"""Closed-book QA with the base model alone or base + MLP memory (the paper's QA evaluation).

    python -m downstream.eval_qa --model_name_or_path MODEL --data_file NQ-open.dev.jsonl --output_dir OUT \
        --protocol released [--memory MEMORY --lmbda 0.5 --memory_temp 1]      # or the released flags:
        [--use_neural_knn --knn_generator_path MEMORY --lmbda 0.5 --knn_temp 1 --do_eval --eval_subset validation]
    python -m downstream.eval_qa --model_name_or_path JOINT_DIR ...             # a joint model (convert --joint)
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

With a memory (`models.joint.settings.MemoryArguments`, loaded with the base by `models.joint.loading.load_joint`;
a joint directory as the model brings its own), every question is answered by the base model alone and by
base + memory at each ``--lmbda``, in one run on the same prompts and batches.

Writes ``OUT/predictions.jsonl`` (one line per question, with its prompt) and ``OUT/qa_results.json`` (also
merged into ``OUT/all_results.json``) with the resolved protocol, speeds with the torch thread count, and
where ``lmbda`` came from; with a memory, one subdirectory per setting (``OUT/base``, ``OUT/lmbda_0.5``, ...)
in the same format, and at the top the first setting with the memory (`downstream.qa_results`). Data loading
is `downstream.qa_data`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import StoppingCriteriaList

from downstream.qa_data import load_qa, recorded_prompt, select
from downstream.qa_metrics import aggregate, score
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
from downstream.qa_results import merge_shards, write_jsonl, write_results, write_settings  # noqa: F401 - interface
from downstream.stopping import AnswerLineComplete, BatchStopStrings, StopStrings
from models.joint.loading import load_joint
from models.joint.settings import DOWNSTREAM, MemoryArguments
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, check_finite_floats, command, flags_given, parse_args, setup_logging
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)


@dataclass
class QAArguments:
    output_dir: str = field(metadata={"help": "Directory for predictions.jsonl and qa_results.json."})
    data_file: str | None = field(default=None, metadata={
        "help": "Local QA file: a JSON list, JSON lines (whatever the suffix), or an object with a 'data' or "
                "'examples' list."})
    dataset_name: str | None = field(default=None, metadata={"help": "datasets-hub name, e.g. nq_open or trivia_qa."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config, e.g. rc.nocontext for trivia_qa."})
    dataset_split: str = field(default="validation", metadata={
        "help": "Hub split to evaluate (--eval_subset is its released name).", "aliases": ["--eval_subset"]})
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
    do_eval: bool = field(default=False, metadata={
        "help": "Released flag: no effect here (the questions are always evaluated); accepted and logged."})
    ignore_pad_token_for_loss: bool | None = field(default=None, metadata={
        "help": "Released flag: no effect here (QA computes no loss); accepted and logged.", "nargs": "?",
        "const": True})

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

    def log_released_flags(self) -> None:
        """One line for each released flag given that has no effect here."""
        for flag, why in (("do_eval", "the questions are always evaluated"),
                          ("ignore_pad_token_for_loss", "QA computes no loss")):
            if getattr(self, flag):
                logger.info("--%s: the released eval_qa.py's flag has no effect here (%s)", flag, why)


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


def apply_protocol_settings(protocol, model_args: PretrainedModelArguments, args, given: set[str]) -> dict:
    """Give ``--torch_dtype`` and ``--per_device_eval_batch_size`` the protocol's values (the authors' for that
    dataset; a QA `Protocol` or TruthfulQA's, which has no batch size) where no flag in ``given`` set them, and
    return the values applied. A preset's ``lmbda`` is not set here: it is the second step of the memory settings'
    lmbda policy (`models.joint.settings.resolve_lmbdas`)."""
    applied = {}
    batch_size = getattr(protocol, "batch_size", None)
    if protocol.torch_dtype is not None and "torch_dtype" not in given:
        model_args.torch_dtype = applied["torch_dtype"] = protocol.torch_dtype
    if batch_size is not None and "per_device_eval_batch_size" not in given:
        args.per_device_eval_batch_size = applied["per_device_eval_batch_size"] = batch_size
    if applied:
        logger.info("--protocol %s: the authors' settings %s (flags override them)", protocol.name,
                    ", ".join(f"--{k} {v}" for k, v in applied.items()))
    return applied


def answer_questions(model_args: PretrainedModelArguments, args: QAArguments, memory_args: MemoryArguments,
                     given: set[str] = frozenset()) -> dict:
    """Answer and score the questions under the base alone and, with a memory, under base + memory at each lmbda;
    write the results (holding the lock of --output_dir is the caller's). ``given``: the flags typed."""
    protocol, template_source = resolve_protocol(args)
    logger.info("Protocol %s (%s); prompt from %s; settings %s", protocol.name, protocol.source, template_source,
                json.dumps(protocol.describe()))
    applied = apply_protocol_settings(protocol, model_args, args, given)
    examples, data_info, where = read_questions(args, protocol)
    if args.num_shards > 1 or args.start or args.max_samples:
        logger.info("Questions %d to %d (shard %d of %d)", where["start"], where["end"] - 1, args.shard_index,
                    args.num_shards)
    preset_lmbda = getattr(protocol, "lmbda", None)  # a QA preset that carries its lmbda (downstream.qa_protocols)
    loaded = load_joint(model_args, memory_args, DOWNSTREAM,
                        preset=(f"--protocol {protocol.name}", preset_lmbda) if preset_lmbda is not None else None)
    tokenizer = loaded.tokenizer
    prompts = make_prompts(examples, protocol, args)
    if args.chat_template:
        prompts = apply_chat_template(tokenizer, prompts, "--tokenizer_name" if model_args.tokenizer_name
                                      else "--model_name_or_path")
    if torch.cuda.is_available():
        loaded.to("cuda")
    prepare_tokenizer(tokenizer, loaded.model)
    common = {"model": loaded.record["model"], "joint_dir": loaded.record["joint_dir"],
              "tokenizer_fingerprint": loaded.record["tokenizer_fingerprint"], "data": data_info, "questions": where,
              "protocol": protocol.describe(), "protocol_settings_applied": applied,
              "torch_dtype": model_args.torch_dtype, "prompt_template": protocol.template, "prompt_source": template_source,
              "settings": {k: v for k, v in asdict(args).items() if k not in ("output_dir", "merge")},
              "device": str(next(loaded.model.parameters()).device), "threads": torch.get_num_threads()}
    settings = [("base", None)] + [(f"lmbda_{lmbda:g}", lmbda) for lmbda in loaded.lmbdas]
    results = {}
    for name, lmbda in settings:
        joint = loaded.joint(lmbda) if lmbda is not None else None
        start = time.perf_counter()
        continuations = generate_answers(loaded.model, tokenizer, prompts, args.per_device_eval_batch_size,
                                         protocol.max_new_tokens, protocol.stop_at_newline, joint, protocol.stop,
                                         add_special_tokens=protocol.add_special_tokens and not args.chat_template,
                                         batch_stop=protocol.batch_stop)  # the chat template has its own specials
        seconds = time.perf_counter() - start
        rows, scores = score_answers(examples, prompts, continuations, protocol)
        memory_record = {key: loaded.record[key] if joint is not None else None for key in
                         ("memory", "memory_kind", "lmbda_source", "memory_temp", "memory_temp_source", "base_check")}
        results[name] = (rows, {**aggregate(scores), "seconds": seconds,
                                "questions_per_second": len(examples) / seconds if seconds > 0 else None,
                                "use_neural_knn": joint is not None, "lmbda": lmbda, **memory_record, **common})
    if len(results) == 1:
        write_results(args.output_dir, *results["base"])
        return results["base"][1]
    return write_settings(args.output_dir, results)


def score_answers(examples: list[dict], prompts: list[str], continuations: list[str],
                  protocol: Protocol) -> tuple[list[dict], list[dict]]:
    """The predictions.jsonl rows and the scores of each question."""
    rows, scores = [], []
    for ex, prompt, continuation in zip(examples, prompts, continuations):
        prediction = extract_answer(continuation, protocol)
        s = score(prediction, ex["golds"], protocol.scoring)
        scores.append(s)
        rows.append({"question": ex["question"], "prompt": prompt, "golds": ex["golds"], "prediction": prediction,
                     "continuation": continuation, **s})
    return rows, scores


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if "--merge" in argv:  # no model: only the QA flags
        (args,) = parse_args((QAArguments,), argv)
        with artifact_lock(args.output_dir, "--output_dir"):
            return merge_shards(args.merge, args.output_dir)
    model_args, args, memory_args = parse_args((PretrainedModelArguments, QAArguments, MemoryArguments), argv)
    args.log_released_flags()
    with artifact_lock(args.output_dir, "--output_dir"):
        return answer_questions(model_args, args, memory_args, flags_given(argv))


cli = command(main)  # the console script of pyproject.toml

if __name__ == "__main__":
    cli()
