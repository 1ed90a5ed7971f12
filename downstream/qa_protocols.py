"""QA protocols: how a question becomes a prompt, when generation stops, what the answer is, how it is scored.

One table, `PROTOCOLS`, chosen with ``downstream.eval_qa --protocol``; explicit flags override a
protocol's values (`Protocol.override`). Each entry names the code it follows:

``default``
    This project's own evaluation, unchanged since the quickstart's numbers: the prompt that the QA
    set's ``meta.json`` records, else the released template; 16 new tokens; a row stops once its answer
    line is complete; the answer is the first non-blank line; exact match, F1 and "contains" after SQuAD
    normalisation.
``released``
    The released evaluation of NQ-open and HotpotQA (github.com/Binn0/MLPMemory,
    ``downstream/eval_qa.py``; its ``downstream/configs/nq.yaml`` in LUMIA-Group/MLPMemory says the
    same). The question gets a ``?`` unless it ends with one, then its first letter is lower-cased
    (``"Who wrote Hamlet"`` -> ``"who wrote Hamlet?"``), in
    ``"Answer these questions:\\nQuestion: {question}\\nAnswer:"``. Greedy, 15 new tokens, the answer is
    the first line of the continuation as generated (a continuation that starts with a newline answers
    nothing). Exact match is SQuAD's; in F1 a gold ``yes``, ``no`` or ``noanswer`` scores 1 when it
    appears anywhere in the normalised prediction (a substring: ``no`` is in ``nothing``). NQ-open
    questions with a gold answer equal to ``)`` are dropped (one of NQ-open's 3,610). The released code
    generates all 15 tokens and keeps the first line; stopping at the first newline gives the same answer.
``webqa``
    The authors' later WebQuestions / TriviaQA evaluator (LUMIA-Group/MLPMemory,
    ``downstream/eval_webqa_triviaqa.py`` and ``configs/webqa.yaml``, after xRAG's): the question as
    given in ``"Answer the questions:\\n\\nQuestion: {question}? The answer is:"`` (the ``?`` is always
    added, so a question ending in ``?`` gets two), greedy, at most 100 new tokens, stopping at a
    newline, ``.`` or ``,``. Scored by ``has_answer``: a gold answer's tokens appear as a contiguous run
    in the prediction's (Unicode NFD, lower-cased; a token is a run of letters, digits and marks, or one
    other visible character), reported beside EM / F1 / contains. Their evaluator stops a batch only
    when every row has produced the same stop string and scores everything generated until then, so its
    predictions depend on the batch size; here each row is cut at its first stop string, which is their
    batch-size-1 behaviour but for the rest of the token that holds the stop string. ``--batch_stop``
    (`Protocol.batch_stop`) runs their batch rule instead: the batch stops once every row has produced one
    and the same stop string, and the prediction is everything generated until then.

Per-dataset presets add the settings the authors ran each dataset with (`Protocol.lmbda`, ``torch_dtype``,
``batch_size``), applied where no flag sets them:

``nq``, ``hotpotqa``
    ``released`` at ``lmbda`` 0.5 in float16, batch 1 (Binn0/MLPMemory ``downstream/eval_qa.sh``;
    LUMIA-Group/MLPMemory ``configs/nq.yaml`` and ``configs/hotpotqa.yaml``); the released code drops the
    ``)`` answers of NQ-open only. It loads the memory without a dtype, so in float32; here the memory
    follows the base model's dtype.
``webquestions``, ``triviaqa``
    ``webqa`` at ``lmbda`` 0.75 and 0.6 in bfloat16, batch 4 (LUMIA-Group/MLPMemory
    ``downstream/eval_webqa_triviaqa.sh``, ``configs/webqa.yaml``, ``configs/triviaqa.yaml``).

Every authors' evaluator encodes a prompt as ``tokenizer(prompt)`` does, with the tokenizer's own special
tokens (a BOS for Llama and Mistral, none for GPT-2): `Protocol.add_special_tokens`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from utils.cli import UsageError

PLACEHOLDER = "{question}"
DEFAULT_PROMPT = "Answer these questions:\nQuestion: {question}\nAnswer:"

QUESTION_STYLES = ("as_given", "released")  # see `format_question`
ANSWER_RULES = ("first_line", "first_line_as_generated", "until_stop", "all_generated")  # see `extract_answer`
SCORINGS = ("squad", "released", "webqa")  # see `downstream.qa_metrics.score`


@dataclass(frozen=True)
class Protocol:
    """Everything that turns a QA record into a scored prediction, besides the model."""

    name: str
    source: str
    template: str | None  # None: the QA set's recorded prompt, else DEFAULT_PROMPT (`default` only)
    question_style: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()  # a row stops at the first of these, and its continuation is cut there
    stop_at_newline: bool = False  # a row stops once a newline follows its first non-blank character
    answer: str = "first_line"
    scoring: str = "squad"
    drop_golds: tuple[str, ...] = ()  # questions with one of these gold answers are not evaluated
    primary: tuple[str, ...] = ("exact_match", "f1")  # the metrics the protocol's source reports
    add_special_tokens: bool = True  # encode prompts with the tokenizer's own special tokens (BOS), as tokenizer(p)
    batch_stop: bool = False  # a batch stops when every row has produced the same stop string (webqa's authors)
    # The run settings the authors used with this preset (None: this project's defaults); flags win over them.
    lmbda: float | None = None  # the memory's weight in the interpolation
    torch_dtype: str | None = None  # the dtype of the base model (and of the memory, which follows it)
    batch_size: int | None = None  # questions per generate call
    overridden: tuple[str, ...] = field(default=())  # the fields that flags set

    def override(self, **values) -> Protocol:
        """This protocol with the given (non-None) values in place of its own; they are listed in ``overridden``."""
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if v is not None}
        return replace(self, **values, overridden=tuple(sorted(values)))

    def describe(self) -> dict:
        """The protocol as JSON values (tuples as lists), for results files."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol(name="default", source="this project (docs/pipeline.md, 'QA and the demo')", template=None,
             question_style="as_given", max_new_tokens=16, stop_at_newline=True, answer="first_line",
             scoring="squad", primary=("exact_match", "f1", "contains")),
    Protocol(name="released", source="github.com/Binn0/MLPMemory downstream/eval_qa.py (NQ-open, HotpotQA)",
             template=DEFAULT_PROMPT, question_style="released", max_new_tokens=15, stop=("\n",),
             answer="first_line_as_generated", scoring="released", drop_golds=(")",)),
    Protocol(name="webqa", source="github.com/LUMIA-Group/MLPMemory downstream/eval_webqa_triviaqa.py "
                                  "(WebQuestions, TriviaQA)",
             template="Answer the questions:\n\nQuestion: {question}? The answer is:", question_style="as_given",
             max_new_tokens=100, stop=("\n", ".", ","), answer="until_stop", scoring="webqa",
             primary=("has_answer",)),
)}
_AUTHORS = "github.com/LUMIA-Group/MLPMemory downstream/"
PROTOCOLS.update({p.name: p for p in (
    replace(PROTOCOLS["released"], name="nq", lmbda=0.5, torch_dtype="float16", batch_size=1,
            source="github.com/Binn0/MLPMemory downstream/eval_qa.py and eval_qa.sh (NQ-open, lmbda 0.50); "
                   f"{_AUTHORS}configs/nq.yaml (float16, batch 1)"),
    replace(PROTOCOLS["released"], name="hotpotqa", lmbda=0.5, torch_dtype="float16", batch_size=1,
            drop_golds=(),
            source="github.com/Binn0/MLPMemory downstream/eval_qa.py and eval_qa.sh (HotpotQA distractor, lmbda "
                   f"0.50); {_AUTHORS}configs/hotpotqa.yaml (float16, batch 1)"),
    replace(PROTOCOLS["webqa"], name="webquestions", lmbda=0.75, torch_dtype="bfloat16", batch_size=4,
            source=f"{_AUTHORS}eval_webqa_triviaqa.py and .sh (WEBQA_LMBDA 0.75), configs/webqa.yaml (bfloat16, "
                   "batch 4)"),
    replace(PROTOCOLS["webqa"], name="triviaqa", lmbda=0.6, torch_dtype="bfloat16", batch_size=4,
            source=f"{_AUTHORS}eval_webqa_triviaqa.py and .sh (TRIVIAQA_LMBDA 0.60), configs/triviaqa.yaml "
                   "(bfloat16, batch 4)"),
)})
BATCH_STOP_PROTOCOLS = ("webqa", "webquestions", "triviaqa")  # the authors' evaluator that stops by batch


def batch_stop_protocol(protocol: Protocol) -> Protocol:
    """``protocol`` under the authors' WebQuestions / TriviaQA batch rule (``--batch_stop``): a batch stops once every
    row has produced one and the same stop string, and the prediction is all the text generated until then."""
    if protocol.name not in BATCH_STOP_PROTOCOLS:
        raise UsageError(f"--batch_stop is the rule of the authors' WebQuestions / TriviaQA evaluator: use it with "
                         f"--protocol {' / '.join(BATCH_STOP_PROTOCOLS)}, not {protocol.name}")
    return replace(protocol, batch_stop=True, answer="all_generated",
                   overridden=tuple(sorted({*protocol.overridden, "answer", "batch_stop"})))


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UsageError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


# ---- prompts -------------------------------------------------------------------------------------

# A question field that already holds "Question: ... Answer:" (TriviaQA's released subset) is unwrapped first,
# so that the template does not add its labels twice.
QUESTION_LABEL = re.compile(r"^\s*(?:question|q)\s*:\s*", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"\s*(?:answer|a)\s*:\s*$", re.IGNORECASE)


def unwrap_question(question: str) -> str:
    """``question`` without the ``Question:`` / ``Answer:`` labels it may already carry."""
    if QUESTION_LABEL.match(question):
        question = _ANSWER_LABEL.sub("", QUESTION_LABEL.sub("", question, count=1))
    return question


def format_question(question: str, style: str = "as_given") -> str:
    """The question as the protocol writes it: labels removed; ``released`` adds a ``?`` unless it ends with
    one and lower-cases the first letter."""
    question = unwrap_question(question)
    if style == "released" and question:
        question = question if question.endswith("?") else question + "?"
        question = question[0].lower() + question[1:]
    return question


def split_template(template: str) -> tuple[str, str]:
    """``(header, item)``: the text before the line that holds ``{question}`` (an instruction such as
    ``"Answer these questions:\\n"``, written once) and that line onwards (repeated per few-shot example)."""
    line_start = template.rfind("\n", 0, template.index(PLACEHOLDER)) + 1
    return template[:line_start], template[line_start:]


def build_prompt(template: str, question: str, style: str = "as_given",
                 shots: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt of ``question``: the template's header, then each few-shot ``(question, answer)`` as the
    template's item followed by `` answer`` and a newline, then the item of ``question``. Without shots this
    is the template with the question in place of ``{question}``."""
    header, item = split_template(template)
    demos = "".join(item.replace(PLACEHOLDER, format_question(q, style)) + f" {a}\n" for q, a in shots)
    return header + demos + item.replace(PLACEHOLDER, format_question(question, style))


def choose_shots(pool: Sequence[dict], question: str, num_fewshot: int, seed: int) -> list[tuple[str, str]]:
    """``num_fewshot`` ``(question, first gold)`` pairs from ``pool`` (records of `downstream.qa_data.load_qa`):
    the first of a seeded shuffle of the pool whose question differs from ``question`` (compared without case
    and labels), so the choice depends on the seed and the question only, never on order or sharding."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    key = unwrap_question(question).strip().casefold()
    shots = []
    for index in order:
        if len(shots) == num_fewshot:
            break
        if unwrap_question(pool[index]["question"]).strip().casefold() != key:
            shots.append((pool[index]["question"], pool[index]["golds"][0]))
    if len(shots) < num_fewshot:
        raise UsageError(f"--num_fewshot {num_fewshot}: --fewshot_file has only {len(shots)} examples other than "
                         f"the question {question!r}")
    return shots


# ---- answers -------------------------------------------------------------------------------------

def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def first_line(continuation: str) -> str:
    """The first line of the continuation, leading whitespace (newlines included) skipped."""
    return continuation.strip().split("\n", 1)[0].strip()


def extract_answer(continuation: str, protocol: Protocol) -> str:
    """The prediction: ``all_generated``: the whole continuation, stripped (the batch rule's); else the
    continuation cut at the protocol's stop strings, then ``first_line`` (first non-blank line),
    ``first_line_as_generated`` (the text before the first newline, even if empty) or ``until_stop`` (all of
    it), stripped."""
    if protocol.answer == "all_generated":
        return continuation.strip()
    text = cut_at_stop(continuation, protocol.stop)
    if protocol.answer == "first_line":
        return first_line(text)
    if protocol.answer == "first_line_as_generated":
        return text.split("\n", 1)[0].strip()
    return text.strip()
