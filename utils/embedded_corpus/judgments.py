"""Yes/no questions and hallucination-judgment items about the eval entities of the embedded corpus.

Both ask about the facts the validation / test splits state (the same held-out entities and facts as
their QA sets), each fact set against a false one in which its value is swapped for another value of
the same relation (another entity's birthplace, another year, another organisation):

* `yes_no_examples`: one question per fact, "Is it true that <the fact>?", stated in the phrasing held
  out of train for that fact, about the true fact or the swapped one (each with probability 1/2); in
  BIG-bench's ``{"examples": [{"input", "target_scores"}]}`` form that `downstream.strategyqa` reads, with
  the prompt settings of the corpus's QA lines (`yes_no_task`). Each example also carries its ``claim``, the
  question of the fact's QA item with the value it states as the answer and every other value of the relation
  in the world as the alternatives, for `downstream.strategyqa`'s ``--judge claim``;
* `hallucination_samples`: one HaluEval "qa" sample per fact, the QA set's question with the right
  answer and the swapped one as ``hallucinated_answer`` (no ``knowledge``: the questions are closed-book),
  as `downstream.halueval` reads them.

They draw from their own `random.Random`, seeded from the corpus seed, after the corpus is complete, so
adding them changed no other file of the corpus.

A model trained on prose and QA lines alone does not know either format: asked zero-shot, or after a few-shot
prompt, the quickstart's base model answered "No" to every item (its tokenizer did not even have " Yes" as one
piece). So train also holds `judgment_drills`: train-only facts (of entities that no eval split mentions, with
values that name none) stated in both formats and answered, half "Yes", in the shapes of the prompts below. They
teach the format, with the answers as ordinary continuations, and say nothing about an eval entity; they draw
from generators of their own (`drill_rng`), so every other line of the corpus stays the same.

Both formats also come with a fixed few-shot prompt (`fewshot_items`), solved examples about facts of entities
that neither eval split mentions (train states those facts; no eval item asks about them), half of them true
and half swapped:

* the yes/no task file's ``task_prefix`` (BIG-bench's field, put before every prompt): `YES_NO_SHOTS` lines
  "Question: Is it true that ...? Answer: Yes" (or "No"), the form of train's QA lines;
* ``halueval_fewshot.txt``: `HALUEVAL_SHOTS` judged samples in HaluEval's completion format, given to
  `downstream.halueval` as its ``--instruction``, as HaluEval's own instruction gives its examples.

The shots draw from a third generator (`fewshot_rng`), so the eval items are the same with and without them.
"""

from __future__ import annotations

import random

from utils.embedded_corpus.prose import FactPlan, _capitalise, _phrasings, _subject
from utils.embedded_corpus.questions import QA_PROMPT
from utils.embedded_corpus.world import RELATIONS, Entity, Fact

YES_NO_QUESTION = "Is it true that {statement}?"
# Shots before each item, so that a prompt fits the quickstart base model's 256 positions (tested): 8 yes/no lines
# take about 190 tokens of the corpus's tokenizer, 4 judged samples about 150 ('#' costs a token each time).
YES_NO_SHOTS = 8
HALUEVAL_SHOTS = 4


def judgment_rng(seed: int) -> random.Random:
    """The generator of the judgment items, apart from the corpus's own (a string seed hashes the same everywhere)."""
    return random.Random(f"embedded-corpus-judgments-{seed}")


def fewshot_rng(seed: int) -> random.Random:
    """The generator of the few-shot examples, apart from the eval items' (which stay the same without them)."""
    return random.Random(f"embedded-corpus-fewshot-{seed}")


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
    return phrased(entity, fact, _phrasings(entity, plan.fact).index(plan.held_out))


def phrased(entity: Entity, fact: Fact, index: int) -> str:
    """``fact`` in its relation's ``index``-th predicate phrasing, after the subject."""
    return f"{_subject(entity)} {_phrasings(entity, fact)[index].text}"


def claim(pair: dict, asked: Fact, values: dict[str, list[str]]) -> dict:
    """The claim of a yes/no example about ``asked`` (the fact, or a swapped one) as its QA item ``pair`` asks it: the
    stated value as the answer, in the QA answers' first form, and every other value of the relation likewise."""
    form = RELATIONS[asked.relation].answers[0]
    return {"question": pair["question"], "answer": form.format(v=asked.value),
            "alternatives": [form.format(v=v) for v in values[asked.relation] if v != asked.value]}


def yes_no_examples(rng: random.Random, facts: list[Fact], by_name: dict[str, Entity],
                    plans: dict[Fact, FactPlan], values: dict[str, list[str]], qa_pairs: list[dict]) -> list[dict]:
    """One BIG-bench example per fact: "Is it true that ...?" about the fact or a swapped one, with its `claim`."""
    examples = []
    for fact, pair in zip(facts, qa_pairs, strict=True):
        true = rng.random() < 0.5
        asked = fact if true else swapped(rng, fact, values)
        question = YES_NO_QUESTION.format(statement=statement(by_name[fact.subject], plans[fact], asked))
        examples.append({"input": question, "target_scores": {"Yes": int(true), "No": int(not true)},
                         "target": "Yes" if true else "No", "claim": claim(pair, asked, values)})
    return examples


def yes_no_task(examples: list[dict], shots: list[dict]) -> dict:
    """A BIG-bench task file: the examples, prompted as the corpus's QA lines ("Question: ... Answer: Yes"), after
    the solved ``shots`` (``task_prefix``, one line each)."""
    before, after = QA_PROMPT.split("{question}")
    prefix = "".join(f"{before}{shot['input']}{after} {shot['target']}\n" for shot in shots)
    return {"name": "embedded_corpus_yes_no", "task_prefix": prefix, "example_input_prefix": before,
            "example_output_prefix": after + " ", "append_choices_to_input": False, "claim_prompt": QA_PROMPT,
            "examples": examples}


def halueval_fewshot_text(shots: list[dict]) -> str:
    """The judged ``shots`` in HaluEval's completion format, a blank line apart (as `downstream.halueval` puts one
    between its instruction and the sample judged)."""
    return "\n\n".join(f"#Question#: {shot['question']}\n#Answer#: {shot['answer']}\n#Your Judgement#: {shot['judgement']}"
                       for shot in shots)


def train_only_facts(entities: dict[str, list[Entity]], eval_facts: dict[str, list[Fact]]) -> list[Fact]:
    """The facts of the entities that no eval split mentions: train states them, no eval item asks about them."""
    asked = {fact.subject for facts in eval_facts.values() for fact in facts}
    return [fact for group in entities.values() for entity in group if entity.name not in asked
            for fact in entity.facts()]


def _balanced_picks(rng: random.Random, pool: list[Fact], count: int) -> list[tuple[Fact, bool]]:
    """``count`` facts of ``pool`` of distinct relations where there are enough, half of them to be stated true
    (the other half swapped), in a random order."""
    by_relation: dict[str, list[Fact]] = {}
    for fact in pool:
        by_relation.setdefault(fact.relation, []).append(fact)
    relations = rng.sample(sorted(by_relation), min(count, len(by_relation)))
    relations += [rng.choice(sorted(by_relation)) for _ in range(count - len(relations))]
    truths = [i < count // 2 for i in range(count)]
    rng.shuffle(truths)
    return [(rng.choice(by_relation[relation]), true) for relation, true in zip(relations, truths)]


def fewshot_items(seed: int, entities: dict[str, list[Entity]], eval_facts: dict[str, list[Fact]],
                  yes_no_shots: int = YES_NO_SHOTS, halueval_shots: int = HALUEVAL_SHOTS) -> dict[str, list[dict]]:
    """The solved examples of both formats (``{"yes_no": [...], "hallucination": [...]}``), about train-only facts.

    A yes/no shot states its fact in a predicate phrasing drawn at random, true or with the value swapped; a
    judged shot asks the fact in a question wording drawn at random and answers it rightly (judgement "No") or
    with a swapped value ("Yes"). Half of each are true. Each shot keeps the true ``fact`` it is about.
    """
    rng = fewshot_rng(seed)
    by_name = {e.name: e for group in entities.values() for e in group}
    values = relation_values(entities)
    pool = train_only_facts(entities, eval_facts)
    yes_no = []
    for fact, true in _balanced_picks(rng, pool, yes_no_shots):
        entity = by_name[fact.subject]
        index = rng.randrange(len(RELATIONS[fact.relation].predicates))
        asked = fact if true else swapped(rng, fact, values)
        yes_no.append({"input": YES_NO_QUESTION.format(statement=phrased(entity, asked, index)),
                       "target": "Yes" if true else "No", "fact": fact})
    judged = []
    for fact, true in _balanced_picks(rng, pool, halueval_shots):
        relation = RELATIONS[fact.relation]
        question = _capitalise(rng.choice(relation.questions).format(s=_subject(by_name[fact.subject])))
        value = fact.value if true else swapped(rng, fact, values).value
        judged.append({"question": question, "answer": relation.answers[0].format(v=value),
                       "judgement": "No" if true else "Yes", "fact": fact})
    return {"yes_no": yes_no, "hallucination": judged}


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
    """``{"yes_no": {split: examples}, "hallucination": {split: samples}, "fewshot": {format: shots}}`` for the eval
    splits of ``qa`` (`fewshot_items` gives the shots)."""
    rng = judgment_rng(seed)
    by_name = {e.name: e for group in entities.values() for e in group}
    values = relation_values(entities)
    items: dict[str, dict[str, list]] = {"yes_no": {}, "hallucination": {}}
    for split, pairs in qa.items():
        items["yes_no"][split] = yes_no_examples(rng, facts[split], by_name, plans, values, pairs)
        items["hallucination"][split] = hallucination_samples(rng, facts[split], pairs, values)
    items["fewshot"] = fewshot_items(seed, entities, {split: facts[split] for split in qa})
    return items


# ----------------------------------------------------------------------------------------------------
# Judgment drills: the two formats in train, about train-only facts
# ----------------------------------------------------------------------------------------------------


def drill_rng(seed: int, use: str = "text") -> random.Random:
    """A generator of train's judgment drills (``use``: "text", or "places" where they go in train), apart from the
    corpus's, whose other text stays the same."""
    return random.Random(f"embedded-corpus-judgment-drills-{use}-{seed}")


def drill_facts(entities: dict[str, list[Entity]], eval_facts: dict[str, list[Fact]]) -> tuple[list[Fact], set[str]]:
    """The facts the drills state, and the names they must not mention: the eval entities' names.

    A drilled fact is a fact of an entity that no eval split mentions whose value names no such entity either,
    so no drill says anything about an eval entity (a country's capital, for instance, would also say which
    country an eval city lies in); and its relation has another value that names none, to swap in.
    """
    banned = {fact.subject for facts in eval_facts.values() for fact in facts}
    values = {relation: [v for v in found if v not in banned] for relation, found in relation_values(entities).items()}
    return [fact for fact in train_only_facts(entities, eval_facts)
            if fact.value not in banned and len(values[fact.relation]) > 1], banned


def _balanced(rng: random.Random, count: int) -> list[bool]:
    """``count`` truths, half of them true (one more false when odd), in a random order."""
    truths = [i < count // 2 for i in range(count)]
    rng.shuffle(truths)
    return truths


def _runs(lines: list[str], size: int, separator: str) -> list[str]:
    """Consecutive ``lines`` joined ``size`` at a time (the last run shorter)."""
    return [separator.join(lines[i:i + size]) for i in range(0, len(lines), size)]


def judgment_drills(seed: int, entities: dict[str, list[Entity]], eval_facts: dict[str, list[Fact]],
                    per_fact: int) -> list[str]:
    """Train's entries that state train-only facts in both judgment formats, each answered, half "Yes".

    For each drilled fact (`drill_facts`), ``per_fact`` yes/no lines, "Question: Is it true that <the fact, true
    or with its value swapped, in a predicate drawn at random>? Answer: Yes" (or "No"), as the yes/no items are
    prompted; and ``per_fact`` judged samples in HaluEval's completion format, the fact asked in a question wording
    drawn at random and answered rightly ("#Your Judgement#: No") or with a swapped value ("Yes"). Swapped values
    never name an eval entity. Yes/no lines come in runs of ``YES_NO_SHOTS + 1`` lines and judged samples in runs of
    ``HALUEVAL_SHOTS + 1``, a blank line apart, the shapes of the two prompts; each run is one entry of train.
    """
    if per_fact == 0:
        return []
    rng = drill_rng(seed)
    by_name = {e.name: e for group in entities.values() for e in group}
    facts, banned = drill_facts(entities, eval_facts)
    values = {relation: [v for v in found if v not in banned] for relation, found in relation_values(entities).items()}
    asked = [fact for fact in facts for _ in range(per_fact)]
    before, after = QA_PROMPT.split("{question}")
    yes_no = []
    for fact, true in zip(asked, _balanced(rng, len(asked))):
        shown = fact if true else swapped(rng, fact, values)
        index = rng.randrange(len(RELATIONS[fact.relation].predicates))
        question = YES_NO_QUESTION.format(statement=phrased(by_name[fact.subject], shown, index))
        yes_no.append(f"{before}{question}{after} {'Yes' if true else 'No'}")
    judged = []
    for fact, true in zip(asked, _balanced(rng, len(asked))):
        relation = RELATIONS[fact.relation]
        question = _capitalise(rng.choice(relation.questions).format(s=_subject(by_name[fact.subject])))
        value = fact.value if true else swapped(rng, fact, values).value
        judged.append(halueval_fewshot_text([{"question": question, "answer": relation.answers[0].format(v=value),
                                              "judgement": "No" if true else "Yes"}]))
    rng.shuffle(yes_no)
    rng.shuffle(judged)
    return _runs(yes_no, YES_NO_SHOTS + 1, "\n") + _runs(judged, HALUEVAL_SHOTS + 1, "\n\n")
