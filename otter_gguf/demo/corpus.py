"""The demo's synthetic corpus: short reviews whose sentiment follows from the words.

Every sentence says something about one or two things with sentiment
adjectives from two fixed lists. The per-token label is decidable from the
text: the mean polarity (+1 positive, -1 negative) of the sentiment words seen
so far in the current sentence, 0 before the first one. A sentence's label is
the sign of its polarity sum.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

POSITIVE = [
    "great", "wonderful", "lovely", "excellent", "delicious", "friendly", "bright",
    "pleasant", "perfect", "amazing", "charming", "fresh", "warm", "superb",
]
NEGATIVE = [
    "awful", "terrible", "horrible", "bland", "rude", "dirty", "broken",
    "gloomy", "boring", "noisy", "stale", "cold", "dreadful", "slow",
]
SUBJECTS = [
    "the food", "the staff", "the room", "the movie", "the weather", "our trip",
    "the service", "the music", "the book", "the garden", "the coffee", "the hotel",
    "the train", "the concert", "the bread", "the view", "the beach", "the museum",
]
ADVERBS = ["really", "very", "quite", "truly", "so", "rather"]
NAMES = ["anna", "ben", "clara", "david", "emma", "felix", "grace", "henry"]
TEMPLATES = [
    "{subj} was {a1} .",
    "{subj} was {adv} {a1} .",
    "{name} said {subj} was {a1} .",
    "i think {subj} is {adv} {a1} .",
    "{subj} was {a1} and {subj2} was {a2} .",
    "{subj} was {a1} but {subj2} was {a2} .",
    "we found {subj} {a1} and {adv} {a2} .",
    "{name} thought {subj} felt {a1} .",
    "after lunch {subj} seemed {a1} .",
    "in the end {subj} was {adv} {a1} and {a2} .",
]
POLARITY = {**{w: 1 for w in POSITIVE}, **{w: -1 for w in NEGATIVE}}


@dataclass(frozen=True)
class Vocabulary:
    """The word lists and templates sentences are made of (default: all of them); a subset makes a split
    that shares no template or word with another (otter_gguf.tools.quality.tasks)."""

    positive: Sequence[str] = tuple(POSITIVE)
    negative: Sequence[str] = tuple(NEGATIVE)
    subjects: Sequence[str] = tuple(SUBJECTS)
    templates: Sequence[str] = tuple(TEMPLATES)


ALL = Vocabulary()


def sentence(rng: random.Random, p_positive: float = 0.5, vocab: Vocabulary = ALL) -> str:
    """One sentence; each sentiment adjective is positive with probability p_positive."""
    def adj() -> str:
        return rng.choice(vocab.positive if rng.random() < p_positive else vocab.negative)

    subj, subj2 = rng.sample(list(vocab.subjects), 2)
    return rng.choice(vocab.templates).format(subj=subj, subj2=subj2, a1=adj(), a2=adj(),
                                              adv=rng.choice(ADVERBS), name=rng.choice(NAMES))


def document(rng: random.Random, vocab: Vocabulary = ALL) -> str:
    """One to three sentences of mixed sentiment."""
    return " ".join(sentence(rng, vocab=vocab) for _ in range(rng.randint(1, 3)))


def corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_docs)]


_WORD = re.compile(r"[a-z]+|\.")


def word_labels(text: str) -> list[tuple[int, int, float]]:
    """(start, end, label) for every word or '.' of text: the running mean
    polarity of the current sentence after that word (0 before any)."""
    out = []
    total = count = 0
    for m in _WORD.finditer(text):
        w = m.group(0)
        if w in POLARITY:
            total += POLARITY[w]
            count += 1
        out.append((m.start(), m.end(), total / count if count else 0.0))
        if w == ".":
            total = count = 0
    return out


def sentence_labels(text: str) -> list[int]:
    """+1 / -1 / 0 for each complete sentence of text (sign of its polarity sum)."""
    labels = []
    for sent in text.split(".")[:-1]:
        s = sum(POLARITY.get(w, 0) for w in _WORD.findall(sent))
        labels.append((s > 0) - (s < 0))
    return labels


def token_labels(text: str, offsets: list[tuple[int, int]]) -> list[float]:
    """Per-token labels: a token gets the label of the last word that ends
    at or before the token's end (0 before the first word)."""
    words = word_labels(text)
    labels = []
    j = 0
    current = 0.0
    for _start, end in offsets:
        while j < len(words) and words[j][1] <= end:
            current = words[j][2]
            j += 1
        labels.append(current)
    return labels
