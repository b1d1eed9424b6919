"""The built-in reward functions a user names by a short word (``accuracy``, ``format``, ``overlong``).

Each is a plain function with TRL's signature (keywords, ``**kwargs`` for the rest), so it also works as a TRL
``reward_funcs`` entry. Their settings come from the options dict given to ``resolve_reward_function`` and are
bound here with :func:`functools.partial` (checked once, at resolve time, not at the first batch):

* ``accuracy``: 1.0 when the completion's final answer equals the ``answer`` column, else 0.0, judged by
  ``math_verify`` (numbers, fractions, LaTeX, ``\\boxed{}``); None where the gold answer cannot be parsed, so a bad
  row is left out rather than scored 0, as TRL's ``accuracy_reward`` does.
* ``format``: 1.0 when the completion text matches ``format_pattern`` (a regex searched anywhere), else 0.0.
* ``overlong``: DAPO's soft overlong punishment (TRL's ``get_soft_overlong_punishment``): 0 up to
  ``max_new_tokens - overlong_buffer`` completion tokens, then linearly down to -1 at ``max_new_tokens``.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Callable

DEFAULT_FORMAT_PATTERN = r"(?is)\banswer\s*(?:is|:)\s*-?\$?\d[\d,]*(?:\.\d+)?"  # "the answer is 42"
DEFAULT_OVERLONG_BUFFER = 16


def completion_text(completion) -> str:
    """The text of one completion: a string (standard data), or the last message's content (conversational)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):  # content parts (multimodal messages): their text
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def accuracy_reward(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 / 0.0: does the completion's answer equal the gold ``answer`` (math_verify); None for an unparsable gold."""
    from math_verify import parse, verify

    # math_verify times out through signal.alarm, which only works in the main thread (TRL does the same).
    main = threading.current_thread() is threading.main_thread()
    if not main:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning, once per call
    parse_timeout, verify_timeout = (5, 5) if main else (None, None)
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_parsed = parse(str(gold), parsing_timeout=parse_timeout) if gold is not None else []
        if not gold_parsed:
            rewards.append(None)
            continue
        predicted = parse(completion_text(completion), parsing_timeout=parse_timeout)
        rewards.append(float(verify(gold_parsed, predicted, timeout_seconds=verify_timeout)))
    return rewards


def format_reward(completions: list, format_pattern: str = DEFAULT_FORMAT_PATTERN, **kwargs) -> list[float]:
    """1.0 when ``format_pattern`` is found in the completion text, else 0.0."""
    pattern = re.compile(format_pattern)
    return [1.0 if pattern.search(completion_text(c)) else 0.0 for c in completions]


def overlong_reward(completion_ids: list[list[int]], max_new_tokens: int, overlong_buffer: int | None = None,
                    **kwargs) -> list[float]:
    """0 up to ``max_new_tokens - overlong_buffer`` tokens, then linear to -1 at ``max_new_tokens`` (and beyond)."""
    buffer = _buffer(max_new_tokens, overlong_buffer)
    start = max_new_tokens - buffer
    return [0.0 if len(ids) <= start else max(-1.0, (start - len(ids)) / buffer) for ids in completion_ids]


def _buffer(max_new_tokens: int, overlong_buffer: int | None) -> int:
    # The default is clamped so that short generations (tests, smoke runs) need no setting; an explicit one is not.
    return min(DEFAULT_OVERLONG_BUFFER, max_new_tokens) if overlong_buffer is None else overlong_buffer


BUILTINS: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward, "overlong": overlong_reward}
OPTIONS = {"accuracy": (), "format": ("format_pattern",), "overlong": ("max_new_tokens", "overlong_buffer")}


def bind_options(name: str, function: Callable, options: dict) -> Callable:
    """``function`` with the options it names bound (a partial named like the built-in), after checking them."""
    chosen = {key: options[key] for key in OPTIONS[name] if options.get(key) is not None}
    _check(name, chosen)
    if not chosen:
        return function
    bound = functools.partial(function, **chosen)
    # Named and documented like the built-in, but no __wrapped__ (update_wrapper's): inspect.signature would follow
    # it to the unbound function and count the bound options as required columns.
    bound.__name__, bound.__qualname__, bound.__doc__ = name, name, function.__doc__
    bound.__module__ = function.__module__
    return bound


def _check(name: str, chosen: dict) -> None:
    if name == "format" and "format_pattern" in chosen:
        try:
            re.compile(chosen["format_pattern"])
        except re.error as error:
            raise ValueError(f"reward_funcs 'format': format_pattern {chosen['format_pattern']!r} is not a regular "
                             f"expression ({error}); fix the pattern.") from error
    if name == "overlong":
        tokens = chosen.get("max_new_tokens")
        if not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"reward_funcs 'overlong': needs option max_new_tokens, the generation length (a positive "
                             f"integer), got {tokens!r}.")
        buffer = _buffer(tokens, chosen.get("overlong_buffer"))
        if not isinstance(buffer, int) or not 1 <= buffer <= tokens:
            raise ValueError(f"reward_funcs 'overlong': overlong_buffer {buffer!r} must be an integer from 1 to "
                             f"max_new_tokens ({tokens}).")
