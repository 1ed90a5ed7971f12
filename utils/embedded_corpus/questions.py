"""The questions of the embedded corpus: question-answer pairs, the QA lines of train, and `QA_PROMPT`.

`qa_pair` fills a question wording of a fact's relation and lists its accepted answers; the QA sets of the
eval splits are such pairs, in the wording held out of train for each fact. `qa_line` turns a pair into a
training line (`QA_PROMPT` then the answer), and `_qa_drills` gives an entity's training QA lines, in the
wordings its fact plans drill.
"""

from __future__ import annotations

from utils.embedded_corpus.prose import FactPlan, _capitalise, _subject
from utils.embedded_corpus.world import RELATIONS, Entity, Fact

QA_PROMPT = "Question: {question} Answer:"  # the form of the QA lines in train; answers follow after a space


def qa_pair(entity: Entity, fact: Fact, question: str) -> dict:
    """The question template ``question`` about ``fact``, filled, with its accepted answers, most specific first."""
    relation = RELATIONS[fact.relation]
    return {"question": _capitalise(question.format(s=_subject(entity))),
            "answer": [a.format(v=fact.value) for a in relation.answers]}


def qa_line(pair: dict) -> str:
    """A QA pair as a training line: QA_PROMPT, a space, the first answer."""
    return f"{QA_PROMPT.format(question=pair['question'])} {pair['answer'][0]}"


def _qa_drills(entity: Entity, plans: list[FactPlan]) -> list[str]:
    """The training QA lines of ``entity``: each fact asked in each of its drilled wordings."""
    return [qa_line(qa_pair(entity, plan.fact, q)) for plan in plans for q in plan.drills]

