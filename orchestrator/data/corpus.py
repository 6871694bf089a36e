"""A text corpus that needs no download: sentences of a small seeded grammar.

The data layer's built-in text data set and EGGROLL's character model both read it.
"""

from __future__ import annotations

import random

_CORPUS_SEED = 20250101
_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas"]
_AGENTS = {
    "cat": "cats",
    "dog": "dogs",
    "fox": "foxes",
    "child": "children",
    "farmer": "farmers",
    "teacher": "teachers",
    "bird": "birds",
    "mouse": "mice",
    "robot": "robots",
    "sailor": "sailors",
}
_THINGS = {
    "apple": "apples",
    "box": "boxes",
    "letter": "letters",
    "lamp": "lamps",
    "boat": "boats",
    "key": "keys",
    "song": "songs",
    "stone": "stones",
    "umbrella": "umbrellas",
    "book": "books",
}
_TRANSITIVE = [
    ("see", "sees", "saw"),
    ("find", "finds", "found"),
    ("carry", "carries", "carried"),
    ("paint", "paints", "painted"),
    ("build", "builds", "built"),
    ("want", "wants", "wanted"),
    ("hide", "hides", "hid"),
    ("sell", "sells", "sold"),
]
_INTRANSITIVE = [
    ("sleep", "sleeps", "slept"),
    ("sing", "sings", "sang"),
    ("run", "runs", "ran"),
    ("wait", "waits", "waited"),
    ("laugh", "laughs", "laughed"),
    ("swim", "swims", "swam"),
]
_ADJECTIVES = ["small", "big", "red", "old", "quiet", "happy", "green", "strange", "empty"]
_PLACES = ["garden", "river", "bridge", "market", "house", "forest", "harbour", "station"]
_PREPOSITIONS = ["in", "near", "under", "behind", "at", "beside"]
_WEEKDAYS = ["Monday", "Tuesday", "Friday", "Sunday"]


class _Grammar:
    """A small stochastic English grammar with agreement, articles, numbers and quotes:
    structure a character model can learn at several scales, with no download."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def pick(self, options: list[str]) -> str:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def noun_phrase(self, nouns: dict[str, str], plural: bool) -> str:
        words = [self.pick(_ADJECTIVES)] if self.chance(0.4) else []
        noun = self.pick(list(nouns))
        words.append(nouns[noun] if plural else noun)
        if plural:
            det = self.pick(["the", "some", "many", str(self.rng.randint(2, 99))])
        else:
            det = self.pick(["the", "a", "this", "every"])
            if det == "a" and words[0][0] in "aeiou":
                det = "an"
        return " ".join([det, *words])

    def subject(self) -> tuple[str, bool]:
        """The subject and whether it is plural (the verb agrees with it)."""
        if self.chance(0.3):
            return self.pick(_NAMES), False
        plural = self.chance(0.4)
        return self.noun_phrase(_AGENTS, plural), plural

    def predicate(self, form: int) -> str:
        """Verb form 0 base, 1 third person singular, 2 past; an object if transitive."""
        if self.chance(0.6):
            verb = self.rng.choice(_TRANSITIVE)[form]
            words = [verb, self.noun_phrase(_THINGS, self.chance(0.4))]
        else:
            words = [self.rng.choice(_INTRANSITIVE)[form]]
        if self.chance(0.4):
            words.append(f"{self.pick(_PREPOSITIONS)} the {self.pick(_PLACES)}")
        if self.chance(0.2):
            words.append(f"on {self.pick(_WEEKDAYS)}")
        elif self.chance(0.1):
            words.append(f"in {self.rng.randint(1800, 2030)}")
        return " ".join(words)

    def clause(self) -> str:
        subject, plural = self.subject()
        form = 2 if self.chance(0.5) else 0 if plural else 1
        return f"{subject} {self.predicate(form)}"

    def question(self) -> str:
        subject, plural = self.subject()
        aux = "did" if self.chance(0.5) else "do" if plural else "does"
        return f"{aux} {subject} {self.predicate(0)}?"

    def sentence(self) -> str:
        roll = self.rng.random()
        if roll < 0.15:
            text = self.question()
        elif roll < 0.3:
            text = f'{self.pick(_NAMES)} said, "{_capitalised(self.clause())}."'
        elif roll < 0.45:
            text = f"{self.clause()}, {self.pick(['and', 'but', 'so'])} {self.clause()}."
        else:
            text = self.clause() + ("!" if self.chance(0.1) else ".")
        return _capitalised(text)


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def generated_corpus(chars: int) -> str:
    """``chars`` characters of grammar sentences, paragraphs on lines; always the same text."""
    grammar = _Grammar(_CORPUS_SEED)
    paragraphs: list[str] = []
    length = 0
    while length < chars:
        sentences = [grammar.sentence() for _ in range(grammar.rng.randint(2, 6))]
        paragraphs.append(" ".join(sentences))
        length += len(paragraphs[-1]) + 1
    return "\n".join(paragraphs)[:chars]
