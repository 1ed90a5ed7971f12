"""The world of the embedded corpus: its sizes, entities, facts and names, and the relations between entities.

`CorpusSizes` says how many entities of each type there are; `build_world` draws them, with syllable-built
names and attributes that mostly point at other entities; `Fact` is one attribute of one entity. `RELATIONS`
holds, for each attribute, how it is put into words (predicates, whole sentences) and asked about (question
wordings, accepted answers): the prose (`utils.embedded_corpus.prose`) and the questions
(`utils.embedded_corpus.questions`) draw their wording from it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from utils.cli import UsageError, check_finite_floats


@dataclass(frozen=True)
class CorpusSizes:
    """How many entities of each type the world holds, and how many of them the eval splits restate."""

    num_countries: int = field(default=5, metadata={"help": "Number of fictional countries."})
    num_cities: int = field(default=40, metadata={"help": "Number of cities (each in a country, on a river)."})
    num_rivers: int = field(default=10, metadata={"help": "Number of rivers."})
    num_organisations: int = field(default=40, metadata={"help": "Number of organisations (companies, guilds)."})
    num_people: int = field(default=120, metadata={"help": "Number of people."})
    eval_fraction: float = field(
        default=0.25,
        metadata={"help": "Fraction of the entities of each type restated in validation (and, disjointly, in test)."},
    )
    qa_drills_per_fact: int = field(
        default=2,
        metadata={
            "help": "Question wordings per fact that train also states as question-answer lines (QA_PROMPT "
            "followed by the answer), for every entity; an eval entity's lines never use the wording its QA "
            "set asks with. 0 leaves QA lines out."
        },
    )
    judgment_drills_per_fact: int = field(
        default=0,
        metadata={
            "help": "Yes/no lines and judged samples per train-only fact in train (facts of entities that no eval "
            "split mentions, with values that name none), half answered 'Yes': they teach the two judgment "
            "formats without stating an eval fact. 0 (the default) leaves them out: with 1, the quickstart's "
            "models learn the formats but its base no longer recalls the QA facts (README, 'What the quickstart "
            "shows')."
        },
    )

    def __post_init__(self) -> None:
        check_finite_floats(self)
        for name in ("num_countries", "num_cities", "num_rivers", "num_organisations", "num_people"):
            if getattr(self, name) < 2:
                raise UsageError(f"--{name} must be >= 2, got {getattr(self, name)}")
        if self.num_cities < self.num_countries:
            raise UsageError("--num_cities must be >= --num_countries (every country has a capital)")
        if not 0.0 < self.eval_fraction <= 0.3:
            raise UsageError(f"--eval_fraction must be in (0, 0.3], got {self.eval_fraction}")
        if not 0 <= self.judgment_drills_per_fact <= 4:
            raise UsageError(f"--judgment_drills_per_fact must be in [0, 4], got {self.judgment_drills_per_fact}")
        most = min(len(relation.questions) for relation in RELATIONS.values()) - 1
        if not 0 <= self.qa_drills_per_fact <= most:
            raise UsageError(f"--qa_drills_per_fact must be in [0, {most}] (one wording per fact is held out "
                             f"for the QA sets), got {self.qa_drills_per_fact}")


# ----------------------------------------------------------------------------------------------------
# The world: entities and facts
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One attribute of one entity: ``(subject, relation, value)``, all plain strings."""

    subject: str
    relation: str
    value: str


@dataclass
class Entity:
    """A fictional entity: its type (``kind``), unique name, and attributes in a fixed order."""

    kind: str
    name: str
    attributes: dict[str, str] = field(default_factory=dict)

    def facts(self) -> list[Fact]:
        """The entity's attributes as facts."""
        return [Fact(self.name, relation, value) for relation, value in self.attributes.items()]


# fmt: off
# Names are two or three syllables from these lists, so a BPE tokenizer trained on the corpus keeps
# each name in 1-3 pieces, and they look like nothing in English.
_FIRST_SYLLABLES = (
    "Ar", "Bel", "Cor", "Dar", "El", "Fen", "Gal", "Hal", "Is", "Jor", "Kel", "Lor", "Mar", "Nor",
    "Or", "Per", "Quel", "Ral", "Sar", "Tor", "Ul", "Var", "Wen", "Yor", "Zan", "Bri", "Cal", "Dor",
    "Eth", "Fal", "Gil", "Kas", "Lun", "Mir", "Nes", "Ost", "Pel", "Rin", "Sel", "Tam", "Vel", "Xan",
)
_MIDDLE_SYLLABLES = ("a", "e", "i", "o", "an", "el", "ir", "or", "u", "ad", "en", "is")
_LAST_SYLLABLES = (
    "dor", "mar", "ven", "thas", "kesh", "wyn", "rath", "nel", "bek", "sund", "vik", "lan", "mon",
    "rest", "dal", "gard", "mir", "tov", "zek", "hollow", "ria", "ra", "na", "ssa", "vane", "rin",
    "dun", "mere", "stad", "wick", "bourne", "holm", "lis", "tal", "quist", "ford",
)

_GIVEN_NAMES_COUNT = 40  # people share given names; family names are unique
_SOURCE_RANGES_COUNT = 12  # mountain ranges where rivers rise
_SEAS_COUNT = 5

OCCUPATIONS = (
    "painter", "architect", "physician", "astronomer", "engineer", "poet", "merchant", "cartographer",
    "botanist", "sculptor", "composer", "judge", "chemist", "shipwright", "historian", "mathematician",
    "weaver", "printer", "lawyer", "surveyor", "glassblower", "clockmaker", "diplomat", "geologist",
    "novelist", "translator", "inventor", "economist",
)
INDUSTRIES = (
    "shipping", "textile", "publishing", "mining", "banking", "brewing", "railway", "printing",
    "glassmaking", "insurance", "timber", "shipbuilding", "pharmaceutical", "telegraph", "farming", "salt",
)
SPECIALITIES = (
    "glassware", "silk", "clocks", "cheese", "pottery", "horses", "lace", "wine", "bells", "carpets",
    "paper", "olives", "tea", "leather", "copper", "marble", "honey", "maps", "lanterns", "violins",
)
ORGANISATION_SUFFIXES = ("Company", "Works", "Guild", "Society", "Trust", "Group", "Foundry", "Press")
# fmt: on


def _name_factory(rng: random.Random) -> Callable[[], str]:
    """A function drawing fresh, never repeated, syllable-built names from ``rng``."""
    used: set[str] = set()

    def draw() -> str:
        while True:
            parts = [rng.choice(_FIRST_SYLLABLES)]
            if rng.random() < 0.35:
                parts.append(rng.choice(_MIDDLE_SYLLABLES))
            parts.append(rng.choice(_LAST_SYLLABLES))
            name = "".join(parts)
            if name not in used and not re.search(r"(.)\1\1", name):
                used.add(name)
                return name

    return draw


def build_world(rng: random.Random, sizes: CorpusSizes) -> dict[str, list[Entity]]:
    """Draw every entity and its attributes; references point at entities of the other types."""
    new_name = _name_factory(rng)
    ranges = [new_name() for _ in range(_SOURCE_RANGES_COUNT)]
    seas = [new_name() for _ in range(_SEAS_COUNT)]
    given = [new_name() for _ in range(_GIVEN_NAMES_COUNT)]

    countries = [Entity("country", new_name()) for _ in range(sizes.num_countries)]
    rivers = [Entity("river", new_name()) for _ in range(sizes.num_rivers)]
    cities = [Entity("city", new_name()) for _ in range(sizes.num_cities)]
    people = [Entity("person", f"{rng.choice(given)} {new_name()}") for _ in range(sizes.num_people)]
    organisations = [
        Entity("organisation", f"{new_name()} {rng.choice(ORGANISATION_SUFFIXES)}")
        for _ in range(sizes.num_organisations)
    ]

    for river in rivers:
        river.attributes["source"] = rng.choice(ranges)
        river.attributes["mouth"] = rng.choice(seas)
        river.attributes["length"] = str(rng.randrange(80, 2400, 5))
    for i, city in enumerate(cities):
        # The first cities are spread over the countries so that each country has one (its capital).
        country = countries[i] if i < len(countries) else rng.choice(countries)
        city.attributes["country"] = country.name
        city.attributes["river"] = rng.choice(rivers).name
        city.attributes["city_founded"] = str(rng.randint(850, 1700))
        city.attributes["population"] = f"{rng.randint(5, 900) * 1000:,}"
        city.attributes["known_for"] = rng.choice(SPECIALITIES)
    for i, country in enumerate(countries):
        country.attributes["capital"] = cities[i].name
        country.attributes["language"] = new_name() + "ic"

    birth_years = {p.name: rng.randint(1650, 1950) for p in people}
    for org in organisations:
        founder = rng.choice(people)
        org.attributes["founder"] = founder.name
        org.attributes["headquarters"] = rng.choice(cities).name
        org.attributes["industry"] = rng.choice(INDUSTRIES)
        org.attributes["org_founded"] = str(birth_years[founder.name] + rng.randint(25, 55))
    for person in people:
        year = birth_years[person.name]
        person.attributes["born_in"] = rng.choice(cities).name
        person.attributes["birth_year"] = str(year)
        person.attributes["occupation"] = rng.choice(OCCUPATIONS)
        person.attributes["employer"] = _pick_employer(rng, organisations, year)
        mentors = [p.name for p in people if year - 60 <= birth_years[p.name] <= year - 15]
        if mentors:
            person.attributes["mentor"] = rng.choice(mentors)
    return {"country": countries, "city": cities, "river": rivers, "organisation": organisations, "person": people}


def _pick_employer(rng: random.Random, organisations: list[Entity], birth_year: int) -> str:
    """An organisation founded before the person turned 45 (any one if none was)."""
    fitting = [o.name for o in organisations if int(o.attributes["org_founded"]) <= birth_year + 45]
    return rng.choice(fitting or [o.name for o in organisations])


# ----------------------------------------------------------------------------------------------------
# Relations: how each attribute is put into words, and asked about
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """How one relation is put into words, and asked about.

    ``predicates`` complete "<subject> ..." (``{v}`` is the value, ``{a_v}`` the value after "a"/"an")
    and can be joined in pairs; ``sentences`` are whole sentences (``{s}`` is the subject);
    ``questions`` are the wordings of the question asking for ``{v}``; ``answers`` the accepted
    answers, most specific first (the first is the one QA lines in train give).
    """

    predicates: tuple[str, ...]
    sentences: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...] = ("{v}",)


# fmt: off
RELATIONS: dict[str, Relation] = {
    # person
    "born_in": Relation(
        ("was born in {v}", "was born in the city of {v}", "was a native of {v}", "came from the city of {v}"),
        ("The birthplace of {s} was {v}.",),
        ("Where was {s} born?", "In which city was {s} born?",
         "What was the birthplace of {s}?", "Which city did {s} come from?")),
    "birth_year": Relation(
        ("was born in the year {v}", "was born in {v}", "came into the world in {v}", "entered the world in {v}"),
        ("In {v}, {s} was born.",),
        ("In what year was {s} born?", "When was {s} born?",
         "What was the birth year of {s}?", "In which year did {s} come into the world?")),
    "occupation": Relation(
        ("worked as {a_v}", "was {a_v} by profession", "earned a living as {a_v}", "made a career as {a_v}"),
        ("By trade, {s} was {a_v}.",),
        ("What was the occupation of {s}?", "What did {s} do for a living?",
         "What was the profession of {s}?", "What was {s} by trade?")),
    "employer": Relation(
        ("worked for {v}", "was employed by {v}", "held a position at {v}", "spent many years at {v}"),
        ("{v} employed {s}.",),
        ("Which organisation did {s} work for?", "Who employed {s}?",
         "Where did {s} work?", "For which organisation did {s} work?")),
    "mentor": Relation(
        ("studied under {v}", "was a student of {v}", "learned the craft from {v}", "trained under {v}"),
        ("The mentor of {s} was {v}.",),
        ("Who was the mentor of {s}?", "Who taught {s}?", "Under whom did {s} study?", "Whose student was {s}?")),
    # city
    "country": Relation(
        ("is a city in {v}", "lies in {v}", "belongs to {v}", "is one of the cities of {v}"),
        ("The city of {s} is located in {v}.",),
        ("In which country is {s}?", "Which country does {s} belong to?",
         "In what country does {s} lie?", "Of which country is {s} a city?")),
    "river": Relation(
        ("stands on the {v} River", "lies on the banks of the {v} River", "is built along the {v} River",
         "grew up beside the {v} River"),
        ("The {v} River flows through {s}.",),
        ("On which river does {s} stand?", "Which river flows through {s}?",
         "What river is {s} built on?", "Along which river does {s} lie?"), ("{v}", "{v} River")),
    "city_founded": Relation(
        ("was founded in {v}", "was established in {v}", "was first settled in {v}", "traces its founding to {v}"),
        ("The city of {s} dates from {v}.",),
        ("In what year was {s} founded?", "When was {s} founded?",
         "When was {s} first settled?", "In which year was {s} established?")),
    "population": Relation(
        ("has a population of about {v}", "is home to roughly {v} people", "counts some {v} inhabitants",
         "has around {v} residents"),
        ("About {v} people live in {s}.",),
        ("About how many people live in {s}?", "What is the population of {s}?",
         "How many inhabitants does {s} have?", "Roughly how many residents does {s} have?")),
    "known_for": Relation(
        ("is known for its {v}", "is famous for its {v}", "is celebrated for its {v}", "is renowned for its {v}"),
        ("Travellers know {s} for its {v}.",),
        ("What is {s} known for?", "What is {s} famous for?",
         "For what is {s} celebrated?", "What is {s} renowned for?")),
    # organisation
    "founder": Relation(
        ("was founded by {v}", "was started by {v}", "owes its founding to {v}", "was set up by {v}"),
        ("{v} founded {s}.",),
        ("Who founded {s}?", "Who started {s}?", "Who set up {s}?", "Who was the founder of {s}?")),
    "headquarters": Relation(
        ("is headquartered in {v}", "has its head office in {v}", "is based in {v}", "keeps its main office in {v}"),
        ("The headquarters of {s} are in {v}.",),
        ("Where is {s} headquartered?", "Where does {s} have its head office?",
         "In which city is {s} based?", "Where are the headquarters of {s}?")),
    "industry": Relation(
        ("is {a_v} company", "works in the {v} industry", "operates in the {v} trade",
         "does business in the {v} sector"),
        ("The business of {s} is {v}.",),
        ("In which industry does {s} work?", "What business is {s} in?",
         "In which trade does {s} operate?", "What sector does {s} do business in?")),
    "org_founded": Relation(
        ("was founded in {v}", "was established in {v}", "opened its doors in {v}", "dates back to {v}"),
        ("{s} has existed since {v}.",),
        ("In what year was {s} founded?", "When was {s} founded?",
         "When did {s} open its doors?", "In which year was {s} established?")),
    # river
    "source": Relation(
        ("rises in the {v} Mountains", "has its source in the {v} Mountains", "begins high in the {v} Mountains",
         "springs from the {v} Mountains"),
        ("The source of {s} is in the {v} Mountains.",),
        ("Where does {s} rise?", "In which mountains does {s} have its source?",
         "Where is the source of {s}?", "From which mountains does {s} spring?"), ("{v} Mountains", "{v}")),
    "mouth": Relation(
        ("flows into the {v} Sea", "empties into the {v} Sea", "drains into the {v} Sea", "ends in the {v} Sea"),
        ("The mouth of {s} is on the {v} Sea.",),
        ("Into which sea does {s} flow?", "Where does {s} end?",
         "Into which sea does {s} empty?", "What sea does {s} drain into?"), ("{v} Sea", "{v}")),
    "length": Relation(
        ("is {v} kilometres long", "has a length of {v} kilometres", "runs for {v} kilometres",
         "stretches for {v} kilometres"),
        ("The length of {s} is {v} kilometres.",),
        ("How many kilometres long is {s}?", "How long is {s}?",
         "What is the length of {s}?", "For how many kilometres does {s} run?"), ("{v}", "{v} kilometres")),
    # country
    "capital": Relation(
        ("has its capital at {v}", "is governed from the capital {v}", "is ruled from {v}", "has {v} as its capital"),
        ("The capital of {s} is {v}.", "{v} is the capital of {s}."),
        ("What is the capital of {s}?", "Which city is the capital of {s}?",
         "From which city is {s} governed?", "Where is the capital of {s}?")),
    "language": Relation(
        ("has {v} as its official language", "speaks {v}", "uses the {v} language", "conducts its affairs in {v}"),
        ("The official language of {s} is {v}.",),
        ("What language is spoken in {s}?", "What is the official language of {s}?",
         "Which language does {s} use?", "In what language does {s} conduct its affairs?")),
}
# fmt: on
