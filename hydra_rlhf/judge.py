"""The demo's gold judge: the VADER sentiment lexicon.

The offline demo's task is to be an **upbeat, friendly assistant**: given an ordinary everyday request
("Any tips for keeping basil alive on a windowsill?"), answer it warmly. The gold judge that defines
"better" is the VADER compound sentiment score of the *response text alone* (the prompt is not scored),
a number in [-1, 1]: -1 is very negative, 0 neutral, +1 very positive. VADER is a rule-based lexicon
(Hutto & Gilbert, 2014; PyPI ``vadersentiment``), so it is deterministic, needs no weights and no network,
and runs in microseconds per text - cheap enough to score every PPO sample and every eval response.

The preference pairs the reward head learns from (``hydra_rlhf/demo_data/demo_preferences_*.jsonl``) were
labelled with this same judge, so "reward model accuracy" and "gold score" measure the same target.

A lexicon judge is easy to game: a policy can learn to append "Great! Wonderful! :)" to everything. Use
:func:`distinct_n` on the policy's samples to catch that kind of collapse (falling diversity while the gold
score rises).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

__all__ = ["gold_score", "gold_scores", "distinct_n"]


@lru_cache(maxsize=1)
def _analyzer():
    """The VADER analyzer, built once (loading its lexicon takes ~50 ms) and shared."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """VADER compound score of one response, in [-1, 1]; 0.0 for empty or neutral text."""
    return float(_analyzer().polarity_scores(text)["compound"])


def gold_scores(texts: Iterable[str]) -> list[float]:
    """VADER compound score of each response text, in [-1, 1] (higher = more upbeat)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over whitespace tokens, pooled across all texts.

    n-grams never span two texts. Returns 0.0 when there are no n-grams at all (every text shorter than
    ``n`` tokens). 1.0 means no n-gram repeats; values falling towards 0 signal mode collapse.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = text.split()
        for i in range(len(tokens) - n + 1):
            unique.add(tuple(tokens[i : i + n]))
            total += 1
    return len(unique) / total if total else 0.0
