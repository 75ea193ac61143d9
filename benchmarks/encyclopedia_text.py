"""Encyclopedia-like English paragraphs and questions about them, generated locally (no download).

Each paragraph describes one entity (a person, a place, a company or a film) in 4-7 sentences drawn from a small
template grammar. Function words ("the", "of", "and", "in", "was", "his", "which", ...) come with the templates, so
they occur at roughly the rates of encyclopedia prose; content words are drawn from a few hundred real English
nouns, verbs and adjectives with Zipf-like frequencies (frequent words listed first); names of people, places and
works are built from syllables, which gives the long tail of rare terms that proper nouns give real text.
Questions are asked about a chosen paragraph's entity, worded like multi-hop QA questions or an agent's search
queries ("who designed the bridge over the river in Dunmore").

The whole corpus is a pure function of ``(num_paragraphs, seed)``.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass

# Bumped whenever the generated text changes, so a cached index of the old text is never reused.
GENERATOR_VERSION = 1

# ------------------------------------------------------------------------------------------------ lexicon
# Within each list, more frequent words come first: a word's weight is 1 / (its rank + 1).

NOUNS = """
city war team house church school village family river station road music party government building
company album population line series film book career station player group history world period area
century land army campaign design collection bridge tower museum castle harbour island valley mountain
garden library hospital college university court theatre market factory railway county region province
kingdom empire republic state nation council parliament office minister election law treaty battle
siege fleet ship engine aircraft machine tool weapon painting sculpture poem novel story character
song record label tour concert festival award prize medal title championship league season match
game score goal victory defeat coach captain founder owner leader member author artist writer singer
actor director producer editor journalist teacher student scholar scientist engineer architect doctor
priest bishop king queen prince princess duke lord knight soldier officer general admiral governor mayor
president chairman judge lawyer farmer merchant trader worker miner sailor pilot explorer inventor
stone wood iron steel copper gold silver glass cloth wool cotton grain wheat corn salt coal oil water
fire light power energy force field space time day night year month week hour season winter summer
spring autumn morning evening sea lake coast shore forest desert plain hill cliff cave road street
square park wall gate door window roof floor hall room tower chapel temple abbey monastery fort palace
estate farm mill mine port dock canal tunnel dam lighthouse observatory laboratory studio gallery
newspaper magazine journal broadcast network channel programme episode volume chapter edition
translation language dialect script letter word name symbol flag coat arms motto anthem tradition
custom ritual ceremony dance costume dish recipe wine beer bread cheese fruit tree flower bird horse
dog cattle sheep fish whale wolf bear lion eagle species genus family plant seed root leaf
""".split()

VERBS_PAST = """
built founded designed wrote published released recorded established created opened completed
developed produced directed discovered invented named described formed joined won lost defeated
captured destroyed restored rebuilt replaced acquired sold bought purchased moved returned served
led commanded ruled governed elected appointed married studied taught trained painted composed
performed played toured signed launched introduced opposed supported funded financed organised
excavated surveyed mapped explored crossed reached defended attacked besieged abandoned
renovated expanded extended enlarged divided merged connected translated edited adapted revised
""".split()

VERBS_BASE = """
build design write record lead command rule govern teach paint compose perform explore cross
defend restore expand translate edit study train found publish direct produce introduce describe
""".split()

ADJECTIVES = """
new first great large small old main early late major national local royal public private
original famous important modern ancient medieval northern southern eastern western central
independent international musical political military religious historical natural coastal rural
urban industrial commercial cultural artistic literary scientific popular successful influential
critical commercial annual former current second third final short long high low wide deep narrow
wooden stone brick iron steel golden silver white black red green blue grey dark bright quiet
famous rare common unusual notable remarkable significant elaborate simple grand modest
""".split()

ADVERBS = "widely highly later largely mostly often briefly strongly generally originally formally".split()

OCCUPATIONS = """
politician writer painter architect engineer composer singer actor footballer historian poet
novelist journalist lawyer physician scientist mathematician philosopher economist sculptor
photographer director producer musician pianist violinist conductor explorer merchant diplomat
soldier general admiral bishop priest teacher professor inventor businessman banker publisher
""".split()

FIELDS = """
law medicine theology philosophy mathematics physics chemistry astronomy engineering architecture
music painting history literature economics geology botany zoology languages navigation
""".split()

NATIONALITIES = """
English French German Italian Spanish American Scottish Irish Dutch Swedish Danish Norwegian Polish
Austrian Swiss Belgian Portuguese Greek Russian Canadian Australian Welsh Czech Hungarian Finnish
""".split()

COUNTRIES = """
England France Germany Italy Spain Scotland Ireland Sweden Norway Denmark Poland Austria Portugal
Greece Canada Australia Wales Hungary Finland Belgium
""".split()

MONTHS = "January February March April May June July August September October November December".split()

SETTLEMENTS = "town village city parish borough hamlet municipality suburb port".split()
STRUCTURES = "bridge tower church castle lighthouse station cathedral mill viaduct hall".split()
MATERIALS = "stone brick iron steel timber concrete granite sandstone".split()
INDUSTRIES = "shipping textile mining brewing publishing railway banking software steel insurance".split()
GENRES = "drama comedy thriller western musical documentary horror adventure romance crime".split()
MEDIA = "film novel play opera album television series".split()
DIRECTIONS = "north south east west northeast northwest southeast southwest".split()
SIDES = "left right north south east west".split()
FIRST_NAMES = """
John William James George Charles Thomas Henry Robert Edward Richard Joseph Frederick Arthur Walter
Albert David Francis Peter Paul Michael Mary Anna Elizabeth Margaret Sarah Jane Emma Alice Catherine
Helen Louise Clara Martha Eleanor Rose Edith Agnes Frances Harriet Lucy Grace Julia Ellen Maria
""".split()

# Syllables for names: two or three of them make a surname, a place name, a river or a company name.
_ONSETS = "b br c ch d dr f g gr h k l m n p r s sh st t th tr v w".split()
_VOWELS = "a e i o u ai ea ou".split()
_CODAS = ["", "n", "r", "l", "s", "m", "th", "ck", "nd", "rt", "ll", "st"]
_PLACE_SUFFIXES = "ton ford burg field ham bury stead wick mouth dale port ley".split()


@dataclass(frozen=True)
class Paragraph:
    """One generated paragraph and the facts its questions are built from."""

    title: str
    text: str
    kind: str
    place: str
    subject: str  # a thing the paragraph says something about, e.g. "bridge"


class _Draws:
    """Words drawn with Zipf-like weights from one list, pre-drawn in blocks so each draw costs a list pop."""

    def __init__(self, rng: random.Random, words: list[str], exponent: float = 1.0) -> None:
        self._rng = rng
        self._words = words
        self._cum_weights = list(itertools.accumulate(1.0 / rank**exponent for rank in range(1, len(words) + 1)))
        self._block: list[str] = []

    def __call__(self) -> str:
        if not self._block:
            self._block = self._rng.choices(self._words, cum_weights=self._cum_weights, k=4096)
        return self._block.pop()


def _syllable_names(rng: random.Random, count: int, suffixes: list[str] | None = None) -> list[str]:
    """``count`` distinct capitalised names of two or three syllables (plus a suffix from ``suffixes``)."""
    names: dict[str, None] = {}  # a dict keeps the drawing order, so rank is unrelated to spelling
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    while len(names) < count:
        parts = rng.choices(syllables, k=rng.randint(2, 3))
        if suffixes:
            parts.append(rng.choice(suffixes))
        names["".join(parts).capitalize()] = None
    return list(names)


class EncyclopediaGenerator:
    """Generates paragraphs in order; the same seed gives the same text."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        rng = self._rng
        # Proper names follow a flatter law than common words (exponent < 1): most are rare, as in an encyclopedia.
        self.surname = _Draws(rng, _syllable_names(rng, 40_000), exponent=0.6)
        self.place = _Draws(rng, _syllable_names(rng, 30_000, _PLACE_SUFFIXES), exponent=0.6)
        self.river = _Draws(rng, _syllable_names(rng, 5_000), exponent=0.6)
        draws = {
            "first_name": FIRST_NAMES, "noun": NOUNS, "verb_past": VERBS_PAST, "verb": VERBS_BASE,
            "adj": ADJECTIVES, "adv": ADVERBS, "occupation": OCCUPATIONS, "field": FIELDS,
            "nationality": NATIONALITIES, "country": COUNTRIES, "month": MONTHS, "settlement": SETTLEMENTS,
            "structure": STRUCTURES, "material": MATERIALS, "industry": INDUSTRIES, "genre": GENRES,
            "medium": MEDIA, "direction": DIRECTIONS, "side": SIDES,
        }  # fmt: skip
        self._words = {name: _Draws(rng, words) for name, words in draws.items()}

    def person(self) -> str:
        return f"{self._words['first_name']()} {self.surname()}"

    def paragraphs(self, count: int) -> list[Paragraph]:
        kinds = self._rng.choices(list(_TEMPLATES), weights=[0.4, 0.3, 0.15, 0.15], k=count)
        return [self._paragraph(kind) for kind in kinds]

    def _paragraph(self, kind: str) -> Paragraph:
        fields = _Fields(self, kind)
        opening, *body = _TEMPLATES[kind]
        sentences = [opening, *self._rng.sample(body + GENERAL, self._rng.randint(3, 6))]
        text = " ".join(sentence.format_map(fields) for sentence in sentences)
        return Paragraph(fields["title"], text, kind, fields["home"], fields["subject"])

    def draw(self, name: str) -> str:
        """A fresh word for template field ``name`` (a trailing digit only tells two fields apart)."""
        base = name.rstrip(string.digits)
        if base in self._words:
            return self._words[base]()
        if base == "name":
            return self.person()
        if base in ("place", "river", "surname"):
            return getattr(self, base)()
        if base == "year":
            return str(self._rng.randint(1550, 2020))
        if base == "number":
            return str(self._rng.randint(2, 399))
        if base == "population":
            return f"{int(self._rng.lognormvariate(8, 1.5)):,}"
        raise KeyError(f"the template field {name!r} has no word list")


class _Fields(dict):
    """A paragraph's fixed fields (its entity, pronouns, home place); any other field is drawn anew each use."""

    def __init__(self, generator: EncyclopediaGenerator, kind: str) -> None:
        self._generator = generator
        she = generator._rng.random() < 0.35
        title = {
            "person": generator.person,
            "place": generator.place,
            "company": lambda: f"{generator.surname()} {generator._words['industry']().capitalize()} Company",
            "film": lambda: f"The {generator._words['noun']().capitalize()} of {generator.place()}",
        }[kind]()
        super().__init__(
            title=title,
            home=generator.place(),
            subject=generator._words["structure" if kind == "place" else "noun"](),
            he="she" if she else "he",
            He="She" if she else "He",
            his="her" if she else "his",
            His="Her" if she else "His",
        )

    def __missing__(self, name: str) -> str:
        return self._generator.draw(name)


_TEMPLATES = {
    "person": [
        "{title} ({year} - {year2}) was a {nationality} {occupation} who {verb_past} the {subject} of {home}.",
        "{He} was born in {home} and studied {field} at the University of {place}.",
        "In {year}, {he} {verb_past} a {adj} {noun} for the {surname} family.",
        "{His} work on {field} was {adv} {verb_past} by the {occupation} {name}.",
        "{He} married {first_name} {surname} in {year} and moved to {place}, where {he} {verb_past} {number} "
        "{noun}s.",
        "After the war {he} became the first {occupation} to {verb} the {adj} {subject} of the {direction}ern "
        "region.",
        "{He} died in {place} in {year} at the age of {number}.",
        "{His} {adj} {noun} is now kept in the {noun2} museum of {home}.",
    ],
    "place": [
        "{title} is a {settlement} in {country}, on the {side} bank of the river {river}.",
        "It had a population of {population} at the {year} census.",
        "The {settlement} was founded in {year} by {name} as a {adj} {noun} for the {industry} trade.",
        "The {subject} over the {river}, designed by {name}, was completed in {year}.",
        "{title} is known for its {adj} {noun} and an annual {noun2} festival, which is held in {month}.",
        "The nearest railway station is at {place}, {number} kilometres to the {direction}.",
        "The {material} {subject} of {title} was {verb_past} in {year} and {verb_past2} in {year2}.",
    ],
    "company": [
        "{title} is a {nationality} {industry} company based in {home}, founded in {year} by {name}.",
        "The company has {number} employees and its main products are {noun}s and {noun2}s.",
        "In {year} it {verb_past} the {adj} {noun} of {place} from {name}.",
        "Its headquarters, a {material} building on the {side} side of {home}, was designed by {name}.",
        "The firm was {adv} {verb_past} by its rivals during the {adj} {noun} of the {year}s.",
    ],
    "film": [
        "{title} is a {year} {nationality} {genre} {medium} directed by {name} and starring {name2}.",
        "The {medium} tells the story of a {adj} {occupation} who {verb_past} the {subject} of {home}.",
        "It was released on {month} {number} and received {adj} reviews from critics.",
        "Filming took place in {place} and {place2} over {number} days.",
        "The music was composed by {name}, who {verb_past} the {adj} {noun} for the {medium}.",
    ],
}

# Sentences that fit any paragraph, for the general vocabulary and function words of encyclopedia prose.
GENERAL = [
    "During the {year}s the {noun} was {verb_past} by {adj} {noun2}s from {place}.",
    "According to {name}, the {noun} of the region had been {verb_past} for more than {number} years.",
    "The {adj} {noun} and the {adj2} {noun2} were among the most {adj3} in {country}.",
    "It is one of the {adj} {noun}s that {name} {verb_past} with {his} {noun2} in {year}.",
    "A {adj} {noun} was {verb_past} near the {subject} in {year}, but it was {verb_past2} soon after.",
]


_QUESTIONS = {
    "person": [
        "who was {title}",
        "where was the {occupation} {title} born",
        "which {subject} in {place} did {title} design",
        "{title} {subject} {place}",
    ],
    "place": [
        "who designed the {subject} over the river in {title}",
        "what is the population of {title}",
        "which river flows through the {settlement} of {title}",
        "{title} {subject} history",
    ],
    "company": [
        "who founded {title}",
        "where is the {industry} company {title} based",
        "{title} headquarters {place}",
    ],
    "film": [
        "who directed the {medium} {title}",
        "which {occupation} is the {medium} {title} about",
        "{title} {medium} release",
    ],
}


def generate(num_paragraphs: int, seed: int) -> list[Paragraph]:
    """``num_paragraphs`` paragraphs, the same for the same arguments."""
    return EncyclopediaGenerator(seed).paragraphs(num_paragraphs)


def questions_about(paragraphs: list[Paragraph], count: int, seed: int) -> tuple[list[str], list[int]]:
    """``count`` questions, each about a random paragraph, and the position of that paragraph (its gold passage)."""
    rng = random.Random(seed + 1)
    generator = EncyclopediaGenerator(seed + 2)
    positions = [rng.randrange(len(paragraphs)) for _ in range(count)]
    questions = []
    for position in positions:
        paragraph = paragraphs[position]
        template = rng.choice(_QUESTIONS[paragraph.kind])
        fields = {"title": paragraph.title, "place": paragraph.place, "subject": paragraph.subject}
        questions.append(template.format_map(_QuestionFields(generator, fields)))
    return questions, positions


class _QuestionFields(dict):
    """A question's facts from its paragraph; other fields (e.g. "occupation") drawn from the lexicon."""

    def __init__(self, generator: EncyclopediaGenerator, facts: dict[str, str]) -> None:
        super().__init__(facts)
        self._generator = generator

    def __missing__(self, name: str) -> str:
        return self._generator.draw(name)
