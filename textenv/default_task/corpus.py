"""A synthetic corpus of short movie reviews with a known sentiment.

Every review is built from an *opening* ("I thought the acting was"), one or two
adjective phrases joined by a connective, and an optional closing sentence:

    I thought the acting was brilliant, but the ending was dull. Skip it.

Each adjective and closing carries a polarity (-2..+2, neutral words 0); the
review's sentiment is their sum. Because the sentiment is known exactly, the
corpus yields preference pairs for the reward model (the more positive review is
preferred) and a ground truth to check the reward model against.

Everything is drawn from one ``random.Random(seed)``, so a seed gives the same
corpus on every machine.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FRAMES = (
    "",
    "I thought",
    "Honestly,",
    "In my opinion",
    "We all felt",
    "To be fair,",
    "For me",
    "My friends said",
    "Overall",
    "I have to say",
)
SUBJECTS = (
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the story",
    "the soundtrack",
    "the cast",
    "the ending",
    "the script",
    "the dialogue",
    "the camera work",
    "the pacing",
    "the lead actor",
    "this picture",
)
VERBS = ("was", "is")

# Adjective polarities. Intensity matters: the reward model must learn that
# "brilliant" beats "good" and "awful" is worse than "dull".
ADJECTIVES = {
    2: ("great", "wonderful", "brilliant", "excellent", "superb", "amazing", "beautiful", "moving"),
    1: ("good", "nice", "fun", "enjoyable", "charming", "pleasant", "solid", "sweet"),
    0: ("long", "short", "loud", "quiet", "colorful", "familiar", "simple", "ordinary", "modern", "strange"),
    -1: ("dull", "weak", "bland", "slow", "messy", "forgettable", "clumsy", "flat"),
    -2: ("awful", "terrible", "horrible", "dreadful", "painful", "unbearable", "stupid", "ugly"),
}
INTENSIFIERS = ("", "", "", "very", "really", "quite", "truly", "rather")
CONNECTIVES = (" and", ", but", " while", ", although", " and also")
CLOSINGS = {
    2: ("I loved every minute.", "A must see.", "Highly recommended."),
    1: ("I would recommend it.", "Worth watching.", "I might watch it again."),
    0: ("It came out last year.", "I saw it on a Sunday.", "It runs about two hours.", "We watched it at home."),
    -1: ("Skip it.", "Not worth the ticket.", "I would not watch it again."),
    -2: ("I hated every minute.", "A total waste of time.", "Avoid it at all costs."),
}

LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class Review:
    text: str
    opening: str
    sentiment: int  # sum of word polarities

    @property
    def label(self) -> str:
        return LABELS[(self.sentiment > 0) - (self.sentiment < 0) + 1]


def openings() -> list[str]:
    """Every review opening, in a fixed order (these are also the env's prompts)."""
    out = []
    for frame in FRAMES:
        for subject in SUBJECTS:
            for verb in VERBS:
                words = f"{frame} {subject} {verb}".strip()
                out.append(words[0].upper() + words[1:])
    return out


def _adjective_phrase(rng: random.Random) -> tuple[str, int]:
    polarity = rng.choice(sorted(ADJECTIVES))
    adjective = rng.choice(ADJECTIVES[polarity])
    intensifier = rng.choice(INTENSIFIERS)
    return (f"{intensifier} {adjective}".strip(), polarity)


def random_review(rng: random.Random, opening: str | None = None) -> Review:
    """One review with uniformly drawn parts (its sentiment is whatever they add to)."""
    opening = opening if opening is not None else rng.choice(openings())
    phrase, sentiment = _adjective_phrase(rng)
    text = f"{opening} {phrase}"
    if rng.random() < 0.6:
        subject = rng.choice(SUBJECTS)
        phrase2, polarity2 = _adjective_phrase(rng)
        text += f"{rng.choice(CONNECTIVES)} {subject} {rng.choice(VERBS)} {phrase2}"
        sentiment += polarity2
    text += "."
    if rng.random() < 0.5:
        polarity3 = rng.choice(sorted(CLOSINGS))
        text += " " + rng.choice(CLOSINGS[polarity3])
        sentiment += polarity3
    return Review(text=text, opening=opening, sentiment=sentiment)


def generate_corpus(n_reviews: int, seed: int = 0) -> list[Review]:
    """``n_reviews`` distinct reviews, a third each negative, neutral and positive.

    Reviews are drawn at random and kept while their sentiment class still has room,
    so the classes are balanced exactly (up to ``n_reviews % 3``) and no text repeats.
    """
    if n_reviews < 3:
        raise ValueError(f"n_reviews must be at least 3 (one per sentiment class), got {n_reviews}")
    rng = random.Random(seed)
    quota = {label: n_reviews // 3 for label in LABELS}
    for label in LABELS[: n_reviews % 3]:
        quota[label] += 1
    seen: set[str] = set()
    reviews: list[Review] = []
    while len(reviews) < n_reviews:
        review = random_review(rng)
        if review.text in seen or quota[review.label] == 0:
            continue
        seen.add(review.text)
        quota[review.label] -= 1
        reviews.append(review)
    return reviews


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and split into (train, eval)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = max(1, round(len(items) * eval_fraction))
    return items[n_eval:], items[:n_eval]


def preference_pairs(reviews: list[Review], n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """``n_pairs`` (chosen, rejected) text pairs; chosen has the strictly higher sentiment."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n_pairs:
        a, b = rng.sample(reviews, 2)
        if a.sentiment == b.sentiment:
            continue
        pairs.append((a.text, b.text) if a.sentiment > b.sentiment else (b.text, a.text))
    return pairs


_POLARITY = {word: polarity for polarity, words in ADJECTIVES.items() for word in words}
_CLOSING_POLARITY = {text: polarity for polarity, texts in CLOSINGS.items() for text in texts}


def lexicon_sentiment(text: str) -> int:
    """The ground-truth sentiment of any text: the summed polarity of its known words and closings.

    Independent of the reward model, so it can check the reward model's scores on
    texts it never saw (for example a policy's samples).
    """
    total = sum(polarity * text.count(closing) for closing, polarity in _CLOSING_POLARITY.items())
    for word in text.replace(",", " ").replace(".", " ").split():
        total += _POLARITY.get(word, 0)
    return total


def _alternatives(options) -> str:
    return "(?:" + "|".join(re.escape(option) for option in options) + ")"


_ADJ_PHRASE = f"(?:{_alternatives([i for i in INTENSIFIERS if i])} )?{_alternatives(_POLARITY)}"
_WELL_FORMED = re.compile(
    f"{_alternatives(openings())} {_ADJ_PHRASE}"
    f"(?:{_alternatives(CONNECTIVES)} {_alternatives(SUBJECTS)} {_alternatives(VERBS)} {_ADJ_PHRASE})?"
    rf"\.(?: {_alternatives(_CLOSING_POLARITY)})?"
)


def is_well_formed(text: str) -> bool:
    """Whether ``text`` is a review of the corpus' grammar (any words, grammatical order)."""
    return _WELL_FORMED.fullmatch(text) is not None
