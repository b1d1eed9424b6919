"""The gold judge (VADER compound) and the collapse metric distinct-n. No models are loaded."""

import math

import pytest

from hydra_rlhf.judge import distinct_n, gold_score, gold_scores


def test_upbeat_beats_gloomy_and_neutral_is_zero():
    upbeat, gloomy, neutral = gold_scores(
        [
            "What a wonderful idea! I'm so happy to help, this will be great fun.",
            "This is terrible. Everything is awful and I feel miserable.",
            "The basil pot is on the windowsill.",
        ]
    )
    assert upbeat > 0.5
    assert gloomy < -0.5
    assert upbeat > gloomy
    assert neutral == 0.0


def test_scores_are_compound_in_range_and_deterministic():
    texts = ["Great!", "Bad.", "", "ok", "I love it :)"]
    scores = gold_scores(texts)
    assert len(scores) == len(texts)
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)
    assert gold_scores(texts) == scores
    assert [gold_score(t) for t in texts] == scores
    assert gold_scores([]) == []
    assert gold_score("") == 0.0


def test_analyzer_is_built_once():
    from hydra_rlhf import judge

    gold_scores(["hello"])
    assert judge._analyzer() is judge._analyzer()


def test_distinct_n_hand_worked():
    # bigrams of "a b a b": (a,b) (b,a) (a,b); of "a b": (a,b) -> 2 unique / 4 total
    assert distinct_n(["a b a b", "a b"], n=2) == 0.5
    # unigrams: a b c a -> 3 unique / 4
    assert distinct_n(["a b c a"], n=1) == 0.75
    # all distinct
    assert distinct_n(["the cat sat", "a dog ran"], n=2) == 1.0
    # n-grams do not span texts: "x" + "y" has no bigram
    assert distinct_n(["x", "y"], n=2) == 0.0
    # identical texts collapse: 3 bigrams each, 3 unique / 9
    assert math.isclose(distinct_n(["good good good good"] * 3, n=2), 1 / 9)
    # whitespace tokens: extra spaces and newlines do not create tokens
    assert distinct_n(["a  b\nc"], n=2) == 1.0


def test_distinct_n_no_ngrams_is_zero():
    assert distinct_n([], n=2) == 0.0
    assert distinct_n(["", "   "], n=1) == 0.0
    assert distinct_n(["one two"], n=3) == 0.0


def test_distinct_n_rejects_bad_n():
    with pytest.raises(ValueError):
        distinct_n(["a b"], n=0)
