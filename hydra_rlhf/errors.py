"""How failures reach a user: one line, ``error: <what, where, what to do>``, and a non-zero exit code.

Every entry point (``recipes/*.py``, ``hydra-rlhf ...``) runs inside :func:`error_boundary`. A Python traceback
appears only with ``HYDRA_RLHF_DEBUG=1`` in the environment.
"""

from __future__ import annotations

import os
import sys

DEBUG_VARIABLE = "HYDRA_RLHF_DEBUG"
OUT_OF_MEMORY = " out of memory"  # in the message of torch's OutOfMemoryError (CUDA, HIP, XPU)


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row; the last good checkpoint is kept."""


class OutOfMemory(RuntimeError):
    """A training step ran out of memory even at one row per micro-batch; the last checkpoint is kept."""


class Interrupted(RuntimeError):
    """The user stopped a run with Ctrl-C; the message says what was saved and how to resume."""


class HubUnreachable(RuntimeError):
    """A name that is no local path and could not be fetched from the Hugging Face hub (offline, typo, gated)."""


# Failures a user causes with their input (a setting, a file, a path, a missing package): exit code 2.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               ModuleNotFoundError, HubUnreachable)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (an OSError as 'reason: path', a KeyError without its quotes)."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def error_boundary(run, *args) -> int:
    """Call ``run(*args)``; turn every failure into one line on stderr and an exit code: 2 for bad input, 1 for
    a run that failed (diverged, or an unexpected error: its type is named), 130 for Ctrl-C."""
    import yaml

    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        status = run(*args)
        return status if isinstance(status, int) else 0
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - the one place every failure is turned into a line
        if debug:
            raise
        if isinstance(error, KeyboardInterrupt):
            print("error: interrupted (Ctrl-C). A run resumes from its last checkpoint with --resume true.",
                  file=sys.stderr)
            return 130
        if isinstance(error, Interrupted):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 130
        if isinstance(error, (*USER_ERRORS, yaml.YAMLError)):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 2
        if isinstance(error, RuntimeError) and not isinstance(error, OutOfMemory) and OUT_OF_MEMORY in str(error):
            print(f"error: out of memory ({one_line(error)[:160]}): lower batch_size, max_new_tokens or "
                  "max_prompt_length, or plan for less with memory_budget.", file=sys.stderr)
            return 1
        if isinstance(error, (NonFiniteError, OutOfMemory)):
            print(f"error: {one_line(error)}", file=sys.stderr)
            return 1
        print(f"error: {type(error).__name__}: {one_line(error)} (set {DEBUG_VARIABLE}=1 for the traceback)",
              file=sys.stderr)
        return 1


def check_positive(owner, *keys: str, allow_zero: bool = False) -> None:
    """A one-line ValueError naming the first of ``keys`` whose value is not > 0 (or >= 0); None is skipped."""
    for key in keys:
        value = getattr(owner, key)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{key} must be {bound}, got {value}.")


def check_at_least_one(owner, *keys: str) -> None:
    """A one-line ValueError naming the first of ``keys`` (counts: sizes, lengths, iterations) below 1; None is
    skipped."""
    for key in keys:
        value = getattr(owner, key)
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}.")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {key} {value!r}: use one of {', '.join(map(str, choices))}.")
