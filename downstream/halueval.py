"""HaluEval: does the model recognise a hallucinated answer? Accuracy with and without the memory.

    python -m downstream.halueval --model_name_or_path MODEL --data_file qa_data.json --output_dir OUT \
        [--task qa] [--judge loglik|generate] [--memory MEMORY --lmbda 0.5 --memory_temp 1]

The model is shown one sample with one answer and asked, in HaluEval's words, whether the answer contains
hallucinated information: HaluEval's judgment instruction of the task (`downstream.halueval_instructions`),
then, as its ``evaluation/evaluate.py`` prompts completion models,

    qa             "\\n\\n#Question#: {question}\\n#Answer#: {answer}\\n#Your Judgement#:"
    dialogue       "\\n\\n#Dialogue History#: {dialogue_history}\\n#Response#: {response}\\n#Your Judgement#:"
    summarization  "\\n\\n#Document#: {document}\\n#Summary#: {summary}\\n#Your Judgement#:"
    general        "\\n\\n#Query#: {user_query}\\n#Response#: {chatgpt_response}\\n#Your Judgement#:"  (ours)

HaluEval's own prompts leave the ``knowledge`` field out; ``--show_knowledge`` adds ``#Knowledge#: ...``
before the question or dialogue. The right answer is "No", the hallucinated one "Yes". Each qa,
dialogue and summarization sample gives two items, its right and its hallucinated answer (HaluEval draws
one of the two at random); a general sample gives one, labelled by its ``hallucination`` field.

The judgment is read (``--judge``):

* ``loglik`` (default): the more likely continuation of " Yes" and " No" (`downstream.loglik`);
* ``generate``: greedy text, ``--max_new_tokens`` of it (or up to the end of text), read as HaluEval's
  ``evaluate.py`` reads the whole response: "." removed, "Yes" or "No" when exactly one of them occurs in
  it, else the judgment failed and counts as wrong;
* ``pair``: no judgment is asked for. The sample's two answers are scored as continuations of the question
  (``--pair_prompt``, by default per task ``PAIR_PROMPTS``, e.g. "Question: {question} Answer:"; with
  ``--show_knowledge`` the knowledge comes first) and the less likely one is judged hallucinated ("Yes"), the
  likelier one not (equal scores: neither). This measures whether the model knows which answer is right,
  whatever it knows of the judgment format; both items of a sample are judged from the same comparison, so
  accuracy is the share of samples whose right answer is the likelier. No instruction is shown (``--instruction``
  other than the default is an error); the general task, one answer per sample, has no pair.

Fields (HaluEval's released files, JSON lines named ``.json``, or the hub's ``pminervini/HaluEval``):
qa ``knowledge``/``question``/``right_answer``/``hallucinated_answer``; dialogue ``knowledge``/
``dialogue_history``/``right_response``/``hallucinated_response``; summarization ``document``/
``right_summary``/``hallucinated_summary``; general ``user_query``/``chatgpt_response``/``hallucination``.
``--task`` is detected from them when not given. Accuracy is reported over all items and over the
right and the hallucinated answers apart, beside the share of "Yes" judgments.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from downstream.choice_eval import (
    ChoiceEvalArguments,
    Item,
    load_model,
    mean_percent,
    memory_minus_base,
    read_records,
    run_record,
    run_settings,
    setting_label,
    settings,
    speed,
    write_results,
)
from downstream.eval_qa import generate_answers
from downstream.halueval_instructions import INSTRUCTIONS
from models.joint.settings import MemoryArguments
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, command, parse_args, setup_logging
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

YES, NO = " Yes", " No"  # the continuations compared; "Yes" means "hallucinated"
# task: (sample fields shown, in order, with their labels; the right and the hallucinated answer's fields)
TASKS = {
    "qa": ((("question", "#Question#"),), "#Answer#", ("right_answer", "hallucinated_answer")),
    "dialogue": ((("dialogue_history", "#Dialogue History#"),), "#Response#",
                 ("right_response", "hallucinated_response")),
    "summarization": ((("document", "#Document#"),), "#Summary#", ("right_summary", "hallucinated_summary")),
    "general": ((("user_query", "#Query#"),), "#Response#", ("chatgpt_response", None)),
}

# --judge pair: the context each answer continues, per task (fields of the sample in braces)
PAIR_PROMPTS = {"qa": "Question: {question} Answer:", "dialogue": "{dialogue_history} [Assistant]:",
                "summarization": "Document: {document}\nSummary:"}
KNOWLEDGE_PREFIX = "Knowledge: {knowledge}\n"


@dataclass
class HaluEvalArguments:
    """Which HaluEval task, and how the judgment is prompted and read."""

    task: str | None = field(default=None, metadata={
        "help": "HaluEval task (default: detected from the fields).", "choices": list(TASKS)})
    judge: str = field(default="loglik", metadata={
        "help": "loglik: the likelier of ' Yes' and ' No'; generate: parse greedy text as HaluEval does; pair: the "
                "less likely of the sample's two answers is judged hallucinated.",
        "choices": ["loglik", "generate", "pair"]})
    instruction: str = field(default="benchmark", metadata={
        "help": "The instruction before the sample: 'benchmark' (HaluEval's, for the task), 'none', or a text file."})
    show_knowledge: bool = field(default=False, metadata={
        "help": "Show the sample's 'knowledge' field as '#Knowledge#: ...' (HaluEval's prompts do not)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per judgment with --judge generate."})
    pair_prompt: str | None = field(default=None, metadata={
        "help": "With --judge pair: the context both answers continue, with the sample's fields in braces "
                "(default per task: qa 'Question: {question} Answer:', dialogue '{dialogue_history} [Assistant]:', "
                "summarization 'Document: {document}\\nSummary:')."})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UsageError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.pair_prompt is not None:
            self.pair_prompt = self.pair_prompt.replace("\\n", "\n")  # a literal \n typed on the command line
            if self.judge != "pair":
                raise UsageError("--pair_prompt is only read with --judge pair")
        if self.judge == "pair" and self.instruction != "benchmark":
            raise UsageError(f"--instruction {self.instruction}: --judge pair shows no instruction (it compares the "
                             "two answers as continuations of the question); leave --instruction out")
        if self.instruction not in ("benchmark", "none") and not os.path.isfile(self.instruction):
            raise UsageError(f"--instruction {self.instruction}: expected 'benchmark', 'none' or a text file")


def detect_task(record: dict, source: str) -> str:
    for task, (_, _, (right, _)) in TASKS.items():
        if right in record:
            return task
    raise UsageError(f"{source}: cannot tell the HaluEval task from the fields {sorted(record)}; give --task")


def instruction_text(task: str, args: HaluEvalArguments) -> str:
    if args.instruction == "benchmark":
        return INSTRUCTIONS[task]
    if args.instruction == "none":
        return ""
    with open(args.instruction, encoding="utf-8") as f:
        return f.read()


def judgment_prompt(instruction: str, shown: list[tuple[str, str]], answer_label: str, answer: str) -> str:
    """HaluEval's completion prompt: the instruction, a blank line, each ``#Label#: value`` line, the answer,
    ``#Your Judgement#:``. Without an instruction the prompt starts at the first field."""
    lines = [f"{label}: {value}" for label, value in shown] + [f"{answer_label}: {answer}", "#Your Judgement#:"]
    body = "\n".join(lines)
    return f"{instruction}\n\n{body}" if instruction else body


def record_items(record: dict, index: int, task: str, instruction: str, show_knowledge: bool,
                 source: str) -> list[Item]:
    """The items of one sample: its right answer (gold "No") and its hallucinated one (gold "Yes"); a general
    sample's one response, gold from its ``hallucination`` label."""
    fields, answer_label, (right, hallucinated) = TASKS[task]
    wanted = [name for name, _ in fields] + [right] + ([hallucinated] if hallucinated else ["hallucination"])
    missing = [name for name in wanted if name not in record]
    if missing:
        raise UsageError(f"{source}: record {index} of HaluEval {task} has no {missing}; it has {sorted(record)}")
    shown = [(label, str(record[name])) for name, label in fields]
    if show_knowledge and record.get("knowledge"):
        shown.insert(0, ("#Knowledge#", str(record["knowledge"])))
    if hallucinated is None:
        label = str(record["hallucination"]).strip().lower()
        if label not in ("yes", "no"):
            raise UsageError(f"{source}: record {index}: 'hallucination' must be 'yes' or 'no', got {label!r}")
        answers = [(record[right], label == "yes")]
    else:
        answers = [(record[right], False), (record[hallucinated], True)]
    return [Item(judgment_prompt(instruction, shown, answer_label, str(answer)), [YES, NO],
                 [int(is_hallucinated), int(not is_hallucinated)],
                 {"sample": index, "answer": str(answer), "hallucinated": is_hallucinated})
            for answer, is_hallucinated in answers]


def pair_item(record: dict, index: int, task: str, template: str, show_knowledge: bool, source: str) -> Item:
    """A sample's two answers as continuations of ``template`` filled with the sample's fields: the right answer
    first (label 1), then the hallucinated one."""
    _, _, (right, hallucinated) = TASKS[task]
    if hallucinated is None:
        raise UsageError(f"--judge pair compares a sample's right and hallucinated answers; HaluEval {task} samples "
                         "have one response each: use --judge loglik or generate")
    missing = [name for name in (right, hallucinated) if name not in record]
    if missing:
        raise UsageError(f"{source}: record {index} of HaluEval {task} has no {missing}; it has {sorted(record)}")
    try:
        context = template.format_map({key: str(value) for key, value in record.items()})
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(f"--pair_prompt {template!r}: record {index} cannot fill it ({error!r}); its fields are "
                         f"{sorted(record)}") from None
    if show_knowledge and record.get("knowledge"):
        context = KNOWLEDGE_PREFIX.format(knowledge=record["knowledge"]) + context
    space = "" if context.endswith((" ", "\n")) else " "
    return Item(context, [space + str(record[right]).strip(), space + str(record[hallucinated]).strip()], [1, 0],
                {"sample": index})


def pair_outcomes(outcomes: list[dict]) -> list[dict]:
    """The two judgments of each sample (its right answer, then its hallucinated one) from its pair's scores: the
    less likely answer is judged hallucinated ("Yes"); ``margin`` is the other answer's log-likelihood minus this
    one's (the leaning towards "Yes")."""
    judged = []
    for outcome in outcomes:
        right, wrong = outcome["logliks"]
        for this, other, hallucinated in ((right, wrong, False), (wrong, right, True)):
            judgment = "Yes" if this < other else "No"
            judged.append({"judgment": judgment, "correct": (judgment == "Yes") == hallucinated,
                           "margin": other - this, "logliks": [this, other]})
    return judged


def parse_judgment(text: str) -> str:
    """HaluEval's reading of generated text: "Yes" or "No" when exactly one occurs (after removing "."),
    else "failed"."""
    text = text.replace(".", "")
    if ("Yes" in text) == ("No" in text):
        return "failed"
    return "Yes" if "Yes" in text else "No"


def generated_outcomes(model, tokenizer, items: list[Item], args: ChoiceEvalArguments, max_new_tokens: int,
                       joint) -> tuple[list[dict], float]:
    start = time.perf_counter()
    texts = generate_answers(model, tokenizer, [item.prompt for item in items], args.per_device_eval_batch_size,
                             max_new_tokens, False, joint)  # the whole response, as HaluEval reads it
    seconds = time.perf_counter() - start
    outcomes = []
    for item, text in zip(items, texts):
        judgment = parse_judgment(text)
        gold = "Yes" if item.labels[0] else "No"
        outcomes.append({"generated": text, "judgment": judgment, "correct": judgment == gold})
    return outcomes, seconds


def setting_metrics(items: list[Item], outcomes: list[dict], judge: str) -> dict:
    said_yes = [o["prediction"] == 0 if judge == "loglik" else o["judgment"] == "Yes" for o in outcomes]
    hallucinated = [item.info["hallucinated"] for item in items]
    metrics = {"accuracy": mean_percent(o["correct"] for o in outcomes),
               "accuracy_on_right_answers": mean_percent(o["correct"] for o, h in zip(outcomes, hallucinated) if not h),
               "accuracy_on_hallucinated_answers": mean_percent(o["correct"] for o, h in zip(outcomes, hallucinated) if h),
               "yes_rate": mean_percent(said_yes)}
    if judge == "generate":
        metrics["failed"] = mean_percent(o["judgment"] == "failed" for o in outcomes)
    return metrics


def evaluate(model_args: PretrainedModelArguments, args: ChoiceEvalArguments, task_args: HaluEvalArguments,
             memory_args: MemoryArguments) -> dict:
    records, source = read_records(args)
    records = records[:args.max_samples]
    task = task_args.task or detect_task(records[0], source)
    instruction = instruction_text(task, task_args)
    items = [item for i, record in enumerate(records)
             for item in record_items(record, i, task, instruction, task_args.show_knowledge, source)]
    if task_args.judge == "pair":
        template = task_args.pair_prompt or PAIR_PROMPTS.get(task, "")
        pairs = [pair_item(record, i, task, template, task_args.show_knowledge, source)
                 for i, record in enumerate(records)]
    loaded = load_model(model_args, memory_args)
    if task_args.judge == "loglik":
        outcomes, speeds = run_settings(loaded, items, args)
    elif task_args.judge == "pair":
        outcomes, speeds = run_settings(loaded, pairs, args)
        outcomes = {name: pair_outcomes(found) for name, found in outcomes.items()}
    else:
        outcomes, speeds = {}, {}
        for name, scorer in settings(loaded):
            outcomes[name], seconds = generated_outcomes(loaded.model, loaded.tokenizer, items, args,
                                                         task_args.max_new_tokens, scorer)
            speeds[name] = speed(len(items), seconds)

    metrics = {"task": task, "judge": task_args.judge, "samples": len(records), "count": len(items),
               **{name: {**setting_metrics(items, results, task_args.judge), **speeds[name]}
                  for name, results in outcomes.items()},
               "instruction": "none" if task_args.judge == "pair" else task_args.instruction,
               "pair_prompt": template if task_args.judge == "pair" else None,
               "show_knowledge": task_args.show_knowledge,
               **run_record(args, loaded, source)}
    if (difference := memory_minus_base(metrics)) is not None:
        metrics["memory_minus_base"] = difference
    rows = [{**item.info, "prompt": pairs[i // 2].prompt if task_args.judge == "pair" else item.prompt,
             "gold": "Yes" if item.labels[0] else "No",
             **{name: results[i] for name, results in outcomes.items()}} for i, item in enumerate(items)]
    write_results(args.output_dir, "halueval", rows, metrics)
    for name in outcomes:
        m = metrics[name]
        logger.info("HaluEval %s %s (judge %s), %s: %d items, accuracy %.2f (right answers %.2f, hallucinated %.2f, "
                    "'Yes' %.2f), %.1f items/s", task, source, task_args.judge, setting_label(name, loaded), len(items),
                    m["accuracy"], m["accuracy_on_right_answers"], m["accuracy_on_hallucinated_answers"],
                    m["yes_rate"], m["items_per_second"] or 0.0)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    model_args, args, task_args, memory_args = parse_args(
        (PretrainedModelArguments, ChoiceEvalArguments, HaluEvalArguments, MemoryArguments), argv)
    with artifact_lock(args.output_dir, "--output_dir"):
        return evaluate(model_args, args, task_args, memory_args)


cli = command(main)

if __name__ == "__main__":
    cli()
