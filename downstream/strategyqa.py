"""StrategyQA: yes/no accuracy from the log-likelihoods of the answers, with and without the memory.

    python -m downstream.strategyqa --model_name_or_path MODEL --data_file task.json --output_dir OUT \
        [--memory MEMORY --lmbda 0.5 --memory_temp 1]      # --model_name_or_path may be a joint directory

BIG-bench's multiple choice: each choice is scored as a continuation of the prompt
(`downstream.loglik`) and the prediction is the most likely one; the gold answer is the choice with the
highest ``target_scores``, or the record's boolean ``answer``, never the explanation text (BIG-bench's
``target``). The always-"No" baseline (the share of questions whose answer is "No") is reported beside it.

Record formats (`downstream.choice_eval.read_records`: local files or a datasets-hub name):

* BIG-bench's task file ``{"examples": [{"input": ..., "target_scores": {"Yes": 1, "No": 0}}, ...]}``; the
  prompt is BIG-bench's: ``task_prefix + example_input_prefix + input`` (+ each choice after
  ``choice_prefix`` when ``append_choices_to_input``) ``+ example_output_prefix``, with the file's settings or,
  where it has none, those of BIG-bench's StrategyQA task (`STRATEGYQA_TASK`: BIG-bench's defaults
  ``"\\nQ: "``, ``"\\nA: "``, ``"\\n  choice: "``, but the choices not appended), leading whitespace removed;
* the original StrategyQA JSON (``question`` and a boolean ``answer``): choices "Yes" and "No", prompted
  as BIG-bench's StrategyQA task prompts them, so the same questions get the same prompt from either file
  (BIG-bench's generic default would append the choices);
* the hub's BIG-bench export (``inputs`` already prompted, ``multiple_choice_targets``,
  ``multiple_choice_scores``), e.g. ``--dataset_name tasksource/bigbench --dataset_config_name strategyqa``.

``--input_prefix``, ``--output_prefix`` and ``--append_choices`` override the file's prompt settings.

How the answer is read (``--judge``):

* ``answer`` (default): the likelier of the choices ("Yes", "No") after the prompt, as BIG-bench scores it;
* ``claim``: the model judges the claim by what it would answer itself. Each example carries the claim as a
  question and its claimed answer, with the other answers the question admits::

      "claim": {"question": "When was Ada Lind born?", "answer": "1825", "alternatives": ["1790", "1801", ...]}

  (the embedded corpus writes them: every other value of the fact's relation in its world). Every candidate is
  scored as a continuation of ``claim_prompt`` (``--claim_prompt``, else the file's, else
  ``"Question: {question} Answer:"``); the verdict is "Yes" when the claimed answer is at least as likely as
  each alternative, else "No". It needs no "Yes" or "No" token, so it measures whether the model knows the fact,
  not whether it knows the format. ``predictions.jsonl`` records each setting's margin (the claimed answer's
  log-likelihood minus the best alternative's) and the answer it found likeliest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from downstream.choice_eval import (
    ChoiceEvalArguments,
    Item,
    load_model,
    mean_percent,
    memory_minus_base,
    read_object,
    read_records,
    run_record,
    run_settings,
    setting_label,
    write_results,
)
from models.joint.settings import MemoryArguments
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, command, parse_args, setup_logging
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

JUDGES = ("answer", "claim")
DEFAULT_CLAIM_PROMPT = "Question: {question} Answer:"

# BIG-bench's JSON task defaults (bigbench/api/json_task.py).
BIGBENCH_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
                     "choice_prefix": "\n  choice: ", "append_choices_to_input": True}
# BIG-bench's StrategyQA task (benchmark_tasks/strategyqa/task.json) turns the appended choices off: the prompt of
# every StrategyQA file that does not say otherwise, the original JSON's included.
STRATEGYQA_TASK = {**BIGBENCH_DEFAULTS, "append_choices_to_input": False}


@dataclass
class StrategyQAArguments:
    """How StrategyQA prompts are written, where the file does not say."""

    input_prefix: str | None = field(default=None, metadata={
        "help": "Text before the question (default: the file's example_input_prefix, else BIG-bench's '\\nQ: ')."})
    output_prefix: str | None = field(default=None, metadata={
        "help": "Text after the question (default: the file's example_output_prefix, else BIG-bench's '\\nA: ')."})
    append_choices: bool | None = field(default=None, metadata={
        "help": "List the choices in the prompt (default: the file's append_choices_to_input, else false, as "
                "BIG-bench's StrategyQA task.json sets it)."})
    judge: str = field(default="answer", metadata={
        "help": "answer: the likelier choice after the prompt; claim: 'Yes' when the example's claimed answer is "
                "the model's likeliest among it and its alternatives (needs each example's 'claim').",
        "choices": list(JUDGES)})
    claim_prompt: str | None = field(default=None, metadata={
        "help": "With --judge claim: the prompt each candidate answer continues, with {question} (default: the "
                "file's claim_prompt, else 'Question: {question} Answer:')."})

    def __post_init__(self):
        for name in ("input_prefix", "output_prefix", "claim_prompt"):  # a literal \n typed on the command line
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).replace("\\n", "\n"))
        if self.claim_prompt is not None and "{question}" not in self.claim_prompt:
            raise UsageError(f"--claim_prompt must contain {{question}}, got {self.claim_prompt!r}")


def prompt_settings(task: dict, args: StrategyQAArguments) -> dict:
    """BIG-bench's prompt settings: the flags, else the task file's, else BIG-bench's StrategyQA task's."""
    found = {key: task.get(key, default) for key, default in STRATEGYQA_TASK.items()}
    overrides = {"example_input_prefix": args.input_prefix, "example_output_prefix": args.output_prefix,
                 "append_choices_to_input": args.append_choices}
    return {**found, **{key: value for key, value in overrides.items() if value is not None}}


def bigbench_prompt(question: str, choices: list[str], prompt: dict) -> str:
    """BIG-bench's zero-shot prompt of one multiple-choice example, leading whitespace removed."""
    text = prompt["example_input_prefix"] + question
    if prompt["append_choices_to_input"]:
        text += "".join(prompt["choice_prefix"] + choice for choice in choices)
    return (prompt["task_prefix"] + text + prompt["example_output_prefix"]).lstrip()


def record_item(record: dict, index: int, prompt: dict, source: str) -> Item:
    """One record as an `Item` whose labels mark the gold answer (the highest target score, or the boolean)."""
    if "target_scores" in record:  # BIG-bench
        scores = record["target_scores"]
        if not isinstance(scores, dict) or len(scores) < 2 or "input" not in record:
            raise UsageError(f"{source}: record {index} needs 'input' and a 'target_scores' object of >= 2 choices")
        choices, best = list(scores), max(scores.values())
        labels = [int(scores[c] == best and best > 0) for c in choices]
        question = record["input"]
    elif "multiple_choice_targets" in record and "inputs" in record:  # the hub's BIG-bench export: already prompted
        choices, scores = list(record["multiple_choice_targets"]), list(record["multiple_choice_scores"])
        return Item(record["inputs"], choices, [int(s == max(scores) and max(scores) > 0) for s in scores],
                    {"input": record["inputs"]})
    elif isinstance(record.get("answer"), bool) and "question" in record:  # the original StrategyQA JSON
        choices, labels, question = ["Yes", "No"], [int(record["answer"]), int(not record["answer"])], record["question"]
    else:
        raise UsageError(f"{source}: record {index} is neither BIG-bench ('input', 'target_scores') nor StrategyQA "
                         f"('question', a boolean 'answer'); it has {sorted(record)}")
    if 1 not in labels:
        raise UsageError(f"{source}: record {index} has no choice with a positive target score")
    return Item(bigbench_prompt(question, choices, prompt), choices, labels, {"input": question})


def is_no(choice: str) -> bool:
    return choice.strip().rstrip(".").lower() == "no"


def is_yes(choice: str) -> bool:
    return choice.strip().rstrip(".").lower() == "yes"


def claim_template(task: dict, args: StrategyQAArguments) -> str:
    """The prompt of ``--judge claim``'s candidates: the flag, else the task file's ``claim_prompt``, else the default."""
    template = args.claim_prompt or task.get("claim_prompt") or DEFAULT_CLAIM_PROMPT
    if "{question}" not in template:
        raise UsageError(f"the task file's claim_prompt must contain {{question}}, got {template!r}")
    return template


def claim_item(record: dict, index: int, template: str, source: str) -> Item:
    """An example's claim as an `Item`: the claim's question in ``template``, the claimed answer as the first choice
    (label 1) and each alternative after it, all as continuations after a space."""
    claim = record.get("claim")
    if not (isinstance(claim, dict) and isinstance(claim.get("question"), str) and isinstance(claim.get("answer"), str)
            and isinstance(claim.get("alternatives"), list)):
        raise UsageError(f"{source}: record {index}: --judge claim needs a 'claim' object with a 'question', the "
                         f"claimed 'answer' and a list of 'alternatives' (strings); the record has {sorted(record)} "
                         "(an embedded corpus written before claims existed gets them from "
                         "`python -m utils.embedded_corpus --output_dir` on its directory)")
    claimed = claim["answer"].strip()
    alternatives = [a for a in dict.fromkeys(str(a).strip() for a in claim["alternatives"]) if a and a != claimed]
    if not claimed or not alternatives:
        raise UsageError(f"{source}: record {index}: a claim needs a non-empty answer and at least one alternative "
                         f"that differs from it; got {claim['answer']!r} and {claim['alternatives']!r}")
    prompt = template.replace("{question}", claim["question"])
    space = "" if prompt.endswith(" ") else " "
    return Item(prompt, [space + c for c in [claimed, *alternatives]], [1] + [0] * len(alternatives),
                {"claim": claimed})


def claim_verdicts(items: list[Item], claims: list[Item], outcomes: list[dict]) -> list[dict]:
    """Each yes/no item's outcome under one setting from its claim's scores: "Yes" when the claimed answer (choice 0
    of the claim, first among equals) is the likeliest, with the margin over the best alternative."""
    verdicts = []
    for item, claim, outcome in zip(items, claims, outcomes):
        said_yes = outcome["prediction"] == 0
        prediction = next(i for i, c in enumerate(item.choices) if (is_yes(c) if said_yes else is_no(c)))
        logliks = outcome["logliks"]
        verdicts.append({"prediction": prediction, "correct": bool(item.labels[prediction]),
                         "margin": logliks[0] - max(logliks[1:]),
                         "likeliest": claim.choices[outcome["prediction"]].strip()})
    return verdicts


def evaluate(model_args: PretrainedModelArguments, args: ChoiceEvalArguments, task_args: StrategyQAArguments,
             memory_args: MemoryArguments) -> dict:
    records, source = read_records(args)
    prompt = prompt_settings(read_object(args.data_file) if args.data_file else {}, task_args)
    records = records[:args.max_samples]
    items = [record_item(record, i, prompt, source) for i, record in enumerate(records)]
    claims = template = None
    if task_args.judge == "claim":
        for i, item in enumerate(items):
            if sorted(map(is_yes, item.choices)) != [False, True] or sorted(map(is_no, item.choices)) != [False, True]:
                raise UsageError(f"{source}: record {i}: --judge claim needs yes/no examples (choices 'Yes' and 'No'), "
                                 f"got {item.choices}")
        template = claim_template(read_object(args.data_file) if args.data_file else {}, task_args)
        claims = [claim_item(record, i, template, source) for i, record in enumerate(records)]
    loaded = load_model(model_args, memory_args)
    outcomes, speeds = run_settings(loaded, claims or items, args)
    if claims:
        outcomes = {name: claim_verdicts(items, claims, found) for name, found in outcomes.items()}

    no_gold = [any(is_no(c) and label for c, label in zip(item.choices, item.labels)) for item in items]
    metrics = {"count": len(items), "judge": task_args.judge, "claim_prompt": template,
               "always_no_accuracy": mean_percent(no_gold),
               **{name: {"accuracy": mean_percent(o["correct"] for o in results), **speeds[name]}
                  for name, results in outcomes.items()},
               "prompt_settings": prompt, **run_record(args, loaded, source)}
    if (difference := memory_minus_base(metrics)) is not None:
        metrics["memory_minus_base"] = difference
    rows = [{**item.info, **(claims[i].info if claims else {}), "prompt": (claims or items)[i].prompt,
             "choices": item.choices, "labels": item.labels,
             **{name: results[i] for name, results in outcomes.items()}} for i, item in enumerate(items)]
    write_results(args.output_dir, "strategyqa", rows, metrics)
    for name in outcomes:
        logger.info("StrategyQA %s (judge %s), %s: %d questions, accuracy %.2f (always 'No' %.2f), %.1f questions/s",
                    source, task_args.judge, setting_label(name, loaded), len(items), metrics[name]["accuracy"],
                    metrics["always_no_accuracy"], metrics[name]["items_per_second"] or 0.0)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    model_args, args, task_args, memory_args = parse_args(
        (PretrainedModelArguments, ChoiceEvalArguments, StrategyQAArguments, MemoryArguments), argv)
    with artifact_lock(args.output_dir, "--output_dir"):
        return evaluate(model_args, args, task_args, memory_args)


cli = command(main)

if __name__ == "__main__":
    cli()
