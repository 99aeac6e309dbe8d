from collections import Counter

import pytest

from textenv.default_task.corpus import (
    generate_corpus,
    is_well_formed,
    lexicon_sentiment,
    openings,
    preference_pairs,
    split,
)


def test_same_seed_same_corpus_other_seed_other_corpus():
    assert generate_corpus(600, seed=3) == generate_corpus(600, seed=3)
    assert [r.text for r in generate_corpus(600, seed=3)] != [r.text for r in generate_corpus(600, seed=4)]


@pytest.mark.parametrize("n", [3, 601, 3000])
def test_classes_balanced_and_texts_distinct(n):
    reviews = generate_corpus(n, seed=0)
    counts = Counter(r.label for r in reviews)
    assert sum(counts.values()) == n
    assert max(counts.values()) - min(counts.values()) <= 1
    assert counts["positive"] == counts["negative"] or n % 3
    assert len({r.text for r in reviews}) == n


def test_label_follows_sentiment_and_sentiment_follows_words():
    reviews = generate_corpus(2000, seed=1)
    for r in reviews:
        assert r.label == ("positive" if r.sentiment > 0 else "negative" if r.sentiment < 0 else "neutral")
        assert lexicon_sentiment(r.text) == r.sentiment
        assert r.text.startswith(r.opening + " ")
        assert is_well_formed(r.text)


def test_lexicon_and_grammar_on_hand_written_texts():
    assert lexicon_sentiment("The movie was brilliant, but the plot was dull. Skip it.") == 2 - 1 - 1
    assert lexicon_sentiment("The movie was long.") == 0
    assert is_well_formed("I thought the acting was very awful. A must see.")
    assert not is_well_formed("I thought the acting was very awful")  # no full stop
    assert not is_well_formed("The movie was great great.")


def test_corpus_needs_three_reviews():
    with pytest.raises(ValueError, match="at least 3"):
        generate_corpus(2)


def test_preference_pairs_prefer_the_more_positive_review():
    reviews = generate_corpus(300, seed=0)
    sentiment = {r.text: r.sentiment for r in reviews}
    pairs = preference_pairs(reviews, 500, seed=0)
    assert len(pairs) == 500
    assert all(sentiment[chosen] > sentiment[rejected] for chosen, rejected in pairs)


def test_split_is_a_partition():
    train, held_out = split(openings(), 0.2, seed=0)
    assert sorted(train + held_out) == sorted(openings())
    assert len(held_out) == round(0.2 * len(openings()))
