"""Yes/no questions and hallucination-judgment items about the eval entities of the embedded corpus.

Both ask about the facts the validation / test splits state (the same held-out entities and facts as
their QA sets), each fact set against a false one in which its value is swapped for another value of
the same relation (another entity's birthplace, another year, another organisation):

* `yes_no_examples`: one question per fact, "Is it true that <the fact>?", stated in the phrasing held
  out of train for that fact, about the true fact or the swapped one (each with probability 1/2); in
  BIG-bench's ``{"examples": [{"input", "target_scores"}]}`` form that `downstream.strategyqa` reads, with
  the prompt settings of the corpus's QA lines (`yes_no_task`);
* `hallucination_samples`: one HaluEval "qa" sample per fact, the QA set's question with the right
  answer and the swapped one as ``hallucinated_answer`` (no ``knowledge``: the questions are closed-book),
  as `downstream.halueval` reads them.

They draw from their own `random.Random`, seeded from the corpus seed, after the corpus is complete, so
adding them changed no other file of the corpus. Train holds no yes/no question and no judgment: a model
trained on it has to transfer what it knows about the facts to a format it has never seen.
"""

from __future__ import annotations

import random

from utils.embedded_corpus.prose import FactPlan, _phrasings, _subject
from utils.embedded_corpus.questions import QA_PROMPT
from utils.embedded_corpus.world import RELATIONS, Entity, Fact

YES_NO_QUESTION = "Is it true that {statement}?"


def judgment_rng(seed: int) -> random.Random:
    """The generator of the judgment items, apart from the corpus's own (a string seed hashes the same everywhere)."""
    return random.Random(f"embedded-corpus-judgments-{seed}")


def relation_values(entities: dict[str, list[Entity]]) -> dict[str, list[str]]:
    """Every distinct value of each relation in the world, sorted."""
    values: dict[str, set[str]] = {}
    for group in entities.values():
        for entity in group:
            for relation, value in entity.attributes.items():
                values.setdefault(relation, set()).add(value)
    return {relation: sorted(found) for relation, found in values.items()}


def swapped(rng: random.Random, fact: Fact, values: dict[str, list[str]]) -> Fact:
    """``fact`` with its value replaced by another value of the same relation."""
    return Fact(fact.subject, fact.relation, rng.choice([v for v in values[fact.relation] if v != fact.value]))


def statement(entity: Entity, plan: FactPlan, fact: Fact) -> str:
    """``fact`` (true or swapped) in the predicate phrasing held out of train for ``plan``'s fact."""
    index = _phrasings(entity, plan.fact).index(plan.held_out)
    return f"{_subject(entity)} {_phrasings(entity, fact)[index].text}"


def yes_no_examples(rng: random.Random, facts: list[Fact], by_name: dict[str, Entity],
                    plans: dict[Fact, FactPlan], values: dict[str, list[str]]) -> list[dict]:
    """One BIG-bench example per fact: "Is it true that ...?" about the fact or a swapped one."""
    examples = []
    for fact in facts:
        true = rng.random() < 0.5
        asked = fact if true else swapped(rng, fact, values)
        question = YES_NO_QUESTION.format(statement=statement(by_name[fact.subject], plans[fact], asked))
        examples.append({"input": question, "target_scores": {"Yes": int(true), "No": int(not true)},
                         "target": "Yes" if true else "No"})
    return examples


def yes_no_task(examples: list[dict]) -> dict:
    """A BIG-bench task file: the examples, prompted as the corpus's QA lines ("Question: ... Answer: Yes")."""
    before, after = QA_PROMPT.split("{question}")
    return {"name": "embedded_corpus_yes_no", "example_input_prefix": before, "example_output_prefix": after + " ",
            "append_choices_to_input": False, "examples": examples}


def hallucination_samples(rng: random.Random, facts: list[Fact], qa_pairs: list[dict],
                          values: dict[str, list[str]]) -> list[dict]:
    """One HaluEval "qa" sample per fact: its QA question, the right answer and a swapped one."""
    samples = []
    for fact, pair in zip(facts, qa_pairs):
        wrong = swapped(rng, fact, values)
        samples.append({"knowledge": "", "question": pair["question"], "right_answer": pair["answer"][0],
                        "hallucinated_answer": RELATIONS[fact.relation].answers[0].format(v=wrong.value)})
    return samples


def judgment_items(seed: int, facts: dict[str, list[Fact]], qa: dict[str, list[dict]],
                   entities: dict[str, list[Entity]], plans: dict[Fact, FactPlan]) -> dict[str, dict[str, list]]:
    """``{"yes_no": {split: examples}, "hallucination": {split: samples}}`` for the eval splits of ``qa``."""
    rng = judgment_rng(seed)
    by_name = {e.name: e for group in entities.values() for e in group}
    values = relation_values(entities)
    items: dict[str, dict[str, list]] = {"yes_no": {}, "hallucination": {}}
    for split, pairs in qa.items():
        items["yes_no"][split] = yes_no_examples(rng, facts[split], by_name, plans, values)
        items["hallucination"][split] = hallucination_samples(rng, facts[split], pairs, values)
    return items
