"""The prose of the embedded corpus: phrasings of facts, the training articles and the eval paragraphs.

`plan_entity` chooses, for each fact of an entity, the phrasings its training article uses and, for an eval
entity, the one predicate (and the one question wording) held out for its validation or test paragraph (and
QA set). `train_article` writes one training article per entity, ending in the list sentences of
`_backlinks`; `eval_paragraph` restates an eval entity's facts in their held-out phrasings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from utils.embedded_corpus.world import RELATIONS, Entity, Fact

# ----------------------------------------------------------------------------------------------------
# Phrasings
# ----------------------------------------------------------------------------------------------------

# Two predicates about one subject in one sentence.
_COMPOUNDS = ("{s}, {who} {a}, {b}.", "{s} {a} and {b}.")

# Connective sentences without facts; one pool per split, so that no split repeats another's sentence.
_FILLERS = {
    "train": (
        "{s} appears in many old records.",
        "Historians have written about {s} at some length.",
        "Much of this history is still debated.",
        "Several accounts of this survive.",
        "The surviving documents agree on the main points.",
        "Some details are known only from letters.",
        "Later writers often returned to this story.",
        "Old maps and registers confirm these facts.",
    ),
    "validation": (
        "A short note on {s} follows.",
        "The letters about {s} agree on these points.",
        "Old registers give the following account of {s}.",
    ),
    "test": (
        "Here is a brief history of {s}.",
        "The records of {s} are clear on these points.",
        "Most documents agree on what follows about {s}.",
    ),
}

# List sentences ending the article of the entity that facts point to: (kind of that entity, relation
# of the listed entities, template). They state facts of the listed entities, in train only.
_BACKLINKS = (
    ("city", "born_in", "Notable people born in {s} include {items}."),
    ("city", "headquarters", "Organisations with their head office in {s} include {items}."),
    ("organisation", "employer", "Among the people who worked for {s} {were} {items}."),
    ("person", "mentor", "The students of {s} included {items}."),
    ("person", "founder", "Among the organisations founded by {s} {were} {items}."),
    ("country", "country", "Cities in {s} include {items}."),
    ("river", "river", "Along {s} lie the cities of {items}."),
)
_MAX_LIST_ITEMS = 6
_TRAIN_MENTIONS = 2  # phrasings of each fact in its entity's training article
_PAIR_PROBABILITY = 0.5  # chance that two adjacent predicates are joined into one sentence


def _subject(entity: Entity) -> str:
    """How an entity is named mid-sentence."""
    return f"the {entity.name} River" if entity.kind == "river" else entity.name


def _capitalise(text: str) -> str:
    """Upper-case the first letter only ("the X River ..." -> "The X River ...")."""
    return text[0].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    """Join items as in "A", "A and B", "A, B and C"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fill(template: str, entity: Entity, value: str) -> str:
    """Fill ``{s}``, ``{v}`` and ``{a_v}`` of a template (``{s}`` left out of predicates)."""
    if "{a_v}" in template:
        template = template.replace("{a_v}", ("an " if value[0] in "aeiou" else "a ") + value)
    return template.replace("{s}", _subject(entity)).replace("{v}", value)


# ----------------------------------------------------------------------------------------------------
# Articles (train) and paragraphs (validation, test)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phrasing:
    """One fact in words: a predicate to put after the subject, or a whole sentence."""

    fact: Fact
    text: str
    is_predicate: bool


@dataclass
class FactPlan:
    """Which phrasings and question wordings of a fact train uses, and which ones are kept for an eval split.

    ``drills`` and ``held_out_question`` are question templates of the fact's relation (``{s}`` unfilled).
    """

    train: list[Phrasing]
    held_out: Phrasing | None
    drills: list[str]
    held_out_question: str | None

    @property
    def fact(self) -> Fact:
        return self.train[0].fact


def _phrasings(entity: Entity, fact: Fact) -> list[Phrasing]:
    """Every phrasing of ``fact``: its relation's predicates, then its whole sentences."""
    relation = RELATIONS[fact.relation]
    return [Phrasing(fact, _fill(t, entity, fact.value), True) for t in relation.predicates] + [
        Phrasing(fact, _capitalise(_fill(t, entity, fact.value)), False) for t in relation.sentences
    ]


def plan_entity(rng: random.Random, entity: Entity, hold_out: bool, drills_per_fact: int) -> list[FactPlan]:
    """Choose the phrasings and the drilled question wordings of each fact of ``entity``.

    With ``hold_out`` one predicate per fact is kept out of the training article for the eval
    paragraph, so that paragraph states the fact in a wording the training text never uses for this
    entity (though it does for others): recalling the value then takes memory, not copying. Likewise
    one question wording per fact is kept out of the training QA lines for the eval split's QA set.
    """
    plans = []
    for fact in entity.facts():
        options = _phrasings(entity, fact)
        held_out = rng.choice([p for p in options if p.is_predicate]) if hold_out else None
        rest = [p for p in options if p is not held_out]
        questions = RELATIONS[fact.relation].questions
        held_out_question = rng.choice(questions) if hold_out else None
        drills = rng.sample([q for q in questions if q != held_out_question], drills_per_fact)
        plans.append(FactPlan(rng.sample(rest, _TRAIN_MENTIONS), held_out, drills, held_out_question))
    return plans


def _group(rng: random.Random, phrasings: list[Phrasing]) -> list[list[Phrasing]]:
    """Split phrasings into sentences of one, or two adjacent predicates joined."""
    groups: list[list[Phrasing]] = []
    for phrasing in phrasings:
        last = groups[-1] if groups else None
        joinable = last is not None and len(last) == 1 and last[0].is_predicate and phrasing.is_predicate
        if joinable and rng.random() < _PAIR_PROBABILITY:
            last.append(phrasing)
        else:
            groups.append([phrasing])
    return groups


def _render(rng: random.Random, entity: Entity, group: list[Phrasing]) -> str:
    """One sentence from a group made by `_group`."""
    subject = _subject(entity)
    if len(group) == 2:
        who = "who" if entity.kind == "person" else "which"
        return _capitalise(rng.choice(_COMPOUNDS).format(s=subject, who=who, a=group[0].text, b=group[1].text))
    if group[0].is_predicate:
        return _capitalise(f"{subject} {group[0].text}.")
    return group[0].text


def _filler(rng: random.Random, entity: Entity, split: str) -> str:
    """A connective sentence without facts, from ``split``'s own pool."""
    return _capitalise(_fill(rng.choice(_FILLERS[split]), entity, ""))


def train_article(
    rng: random.Random, entity: Entity, plans: list[FactPlan], backlinks: list[tuple[str, list[Fact]]]
) -> tuple[str, list[Fact]]:
    """One training article: every fact in each of its planned phrasings, fillers, list sentences."""
    sentences = []
    for mention in range(_TRAIN_MENTIONS):
        if mention:
            sentences.append(_filler(rng, entity, "train"))
        phrasings = [plan.train[mention] for plan in plans]
        rng.shuffle(phrasings)
        sentences += [_render(rng, entity, group) for group in _group(rng, phrasings)]
    stated = entity.facts()
    for sentence, listed in backlinks:
        sentences.append(sentence)
        stated += listed
    if rng.random() < 0.5:
        sentences.append(_filler(rng, entity, "train"))
    return " ".join(sentences), stated


def eval_paragraph(rng: random.Random, entity: Entity, plans: list[FactPlan], split: str) -> tuple[str, list[Fact]]:
    """A validation or test paragraph restating each fact of ``entity`` once.

    Each fact is stated in its held-out phrasing, except that some sentences join a held-out
    predicate with a trained predicate of another fact: the trained wording then appears with its
    exact training context ("X was born in ...") but inside a sentence that train does not contain.
    """
    plans = list(plans)
    rng.shuffle(plans)
    groups: list[list[Phrasing]] = []
    i = 0
    while i < len(plans):
        group = [plans[i].held_out]
        known = [p for p in plans[i + 1].train if p.is_predicate] if i + 1 < len(plans) else []
        if known and rng.random() < _PAIR_PROBABILITY:
            group.insert(rng.randint(0, 1), rng.choice(known))
            i += 1
        groups.append(group)
        i += 1
    sentences = [_filler(rng, entity, split)] + [_render(rng, entity, group) for group in groups]
    return " ".join(sentences), [p.fact for group in groups for p in group]


def _backlinks(rng: random.Random, world: dict[str, list[Entity]]) -> dict[str, list[tuple[str, list[Fact]]]]:
    """For each entity name, the list sentences that end its article and the facts each one states."""
    by_name = {e.name: e for entities in world.values() for e in entities}
    out: dict[str, list[tuple[str, list[Fact]]]] = {name: [] for name in by_name}
    for target_kind, relation, template in _BACKLINKS:
        pointing: dict[str, list[Fact]] = {}
        for entities in world.values():
            for e in entities:
                target = e.attributes.get(relation)
                if target is not None and by_name[target].kind == target_kind:
                    pointing.setdefault(target, []).append(Fact(e.name, relation, target))
        for target, facts in pointing.items():
            if len(facts) > _MAX_LIST_ITEMS:
                facts = rng.sample(facts, _MAX_LIST_ITEMS)
            items = _join([_subject(by_name[f.subject]) for f in facts])
            text = template.replace("{items}", items).replace("{were}", "were" if len(facts) > 1 else "was")
            out[target].append((_capitalise(_fill(text, by_name[target], "")), facts))
    return out

