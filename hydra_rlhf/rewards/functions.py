"""Reward functions in TRL's convention: naming one (a spec), calling it, and checking what it returned.

A reward function is any callable ``f(prompts=..., completions=..., completion_ids=..., **columns)`` that returns
one number (or None: "does not apply to this row") per completion, exactly what TRL's ``GRPOTrainer`` calls, so a
function written for TRL works here unchanged. This module owns the three places a user's code meets ours, and
turns every way that meeting can fail into one line naming the function and what to do: resolving the spec
(:func:`resolve_reward_function`), checking the prompt data has the columns it asks for (:func:`check_columns`,
before training starts) and calling it (:func:`call_reward_function`, the result validated row by row).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# What the caller passes itself; every other parameter is a column of the prompt data.
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids")
# TRL leaves these out of the columns it passes (the per-row prompt and completion come as the lists above).
NOT_COLUMNS = ("prompt", "completion", "completion_ids", "prompts", "completions")


@dataclass(frozen=True)
class RewardFunction:
    """A resolved reward function: its name (metric keys), the callable, and the keywords it accepts."""

    name: str
    function: Callable = field(repr=False)
    parameters: tuple[str, ...]  # the named parameters it takes by keyword
    required: tuple[str, ...]  # those of them without a default
    takes_kwargs: bool  # it has **kwargs: every column is passed
    spec: str = ""  # what the user wrote, for messages
    options: dict | None = field(default=None, repr=False, compare=False)
    origin: str = field(default="", repr=False, compare=False)  # the spec with an absolute file path

    def __reduce__(self):
        # A function loaded from a file cannot be pickled by reference (its module is no importable name), and the
        # async generator process receives the reward sources pickled: so it resolves the spec again over there.
        if not self.origin:
            return RewardFunction, (self.name, self.function, self.parameters, self.required, self.takes_kwargs,
                                    self.spec, self.options)
        return _rebuild, (self.origin, self.options, self.name, self.spec)

    def renamed(self, name: str) -> RewardFunction:
        return RewardFunction(name, self.function, self.parameters, self.required, self.takes_kwargs, self.spec,
                              self.options, self.origin)


def _rebuild(origin: str, options: dict | None, name: str, spec: str) -> RewardFunction:
    fn = resolve_reward_function(origin, options)
    return RewardFunction(name, fn.function, fn.parameters, fn.required, fn.takes_kwargs, spec, options, origin)


# ------------------------------------------------------------------------------------------------ resolving


def resolve_reward_function(spec: str, options: dict | None = None) -> RewardFunction:
    """The function ``spec`` names: ``package.module:function``, ``path/to/file.py:function`` (relative to the
    working directory) or a built-in short name (:data:`hydra_rlhf.rewards.builtins.BUILTINS`). ``options`` binds
    the built-ins' settings (``format_pattern``, ``max_new_tokens``, ``overlong_buffer``); a built-in takes those it
    names and ignores the rest, so one options dict can serve them all. User functions get no options."""
    from .builtins import BUILTINS, bind_options

    spec = spec.strip()
    if spec in BUILTINS:
        return describe(bind_options(spec, BUILTINS[spec], options or {}), spec, spec, options=options, origin=spec)
    where, colon, attribute = spec.rpartition(":")
    if not colon or not where or not attribute:
        raise ValueError(f"reward_funcs {spec!r}: not a built-in ({', '.join(BUILTINS)}) and not of the form "
                         "package.module:function or path/to/file.py:function; name one of those.")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _load_file(spec, where) if is_file else _import_module(spec, where)
    if not hasattr(module, attribute):
        raise ValueError(f"reward_funcs {spec!r}: {where} has no {attribute!r}; check the name after the ':'.")
    function = getattr(module, attribute)
    if not callable(function):
        raise ValueError(f"reward_funcs {spec!r}: {attribute} in {where} is a {type(function).__name__}, not a "
                         "function; name a function (or callable) that returns one reward per completion.")
    origin = f"{Path(where).resolve()}:{attribute}" if is_file else spec
    return describe(function, getattr(function, "__name__", attribute), spec, origin=origin)


def resolve_reward_functions(specs: list, options: dict | None = None) -> list[RewardFunction]:
    """Every spec resolved, names made unique (:func:`unique_names`): what a run's ``reward_funcs`` list becomes.
    From Python (a notebook) an entry may also be the function itself, as TRL allows."""
    return unique_names([resolve_reward_function(spec, options) if isinstance(spec, str)
                         else describe(spec, getattr(spec, "__name__", type(spec).__name__)) for spec in specs])


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # Only "the named module itself is missing" is the user's spec; a module it imports is their import error.
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            raise ValueError(f"reward_funcs {spec!r}: there is no module {name!r} here; give an importable module "
                             "(on PYTHONPATH) or the path of a .py file, path/to/file.py:function.") from error
        raise _import_failed(spec, name, error) from error
    except Exception as error:  # noqa: BLE001 - any failure inside the user's module is reported as theirs
        raise _import_failed(spec, name, error) from error


def _load_file(spec: str, where: str):
    path = Path(where).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reward_funcs {spec!r}: file {where} does not exist (paths are relative to the "
                                f"working directory, {Path.cwd()}).")
    # A unique module name per file, registered before it runs: dataclasses and pickling look modules up by name.
    name = f"hydra_rlhf_reward_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward_funcs {spec!r}: {where} cannot be loaded as Python; name a .py file.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure inside the user's file is reported as theirs
        sys.modules.pop(name, None)
        raise _import_failed(spec, where, error) from error
    return module


def _import_failed(spec: str, where: str, error: BaseException) -> ValueError:
    return ValueError(f"reward_funcs {spec!r}: importing {where} failed: {type(error).__name__}: {_line(error)}")


def _line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def describe(function: Callable, name: str, spec: str = "", options: dict | None = None,
             origin: str = "") -> RewardFunction:
    """A :class:`RewardFunction` for a callable: what it takes, from its signature."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward_funcs {spec or name!r}: cannot read the signature of {name} ({_line(error)}); "
                         "write it as a Python function with named parameters.") from error
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in signature.parameters.values() if p.kind in by_keyword]
    return RewardFunction(
        name=name, function=function, parameters=tuple(p.name for p in named),
        required=tuple(p.name for p in named if p.default is inspect.Parameter.empty),
        takes_kwargs=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()),
        spec=spec, options=options, origin=origin)


def unique_names(functions: list[RewardFunction]) -> list[RewardFunction]:
    """The functions with distinct names: a repeated name gets ``_2``, ``_3``... in order (metric keys must differ)."""
    seen: set[str] = set()
    unique = []
    for fn in functions:
        name, n = fn.name, 1
        while name in seen:
            n += 1
            name = f"{fn.name}_{n}"
        seen.add(name)
        unique.append(fn if name == fn.name else fn.renamed(name))
    return unique


# ------------------------------------------------------------------------------------------------ checking columns


def check_columns(functions: list[RewardFunction], available: list[str]) -> None:
    """Before training: every parameter a function needs (no default) is a column of the prompt data."""
    present = set(available) - set(NOT_COLUMNS)
    for fn in functions:
        lacking = [p for p in fn.required if p not in CALL_ARGUMENTS and p not in present]
        if lacking:
            noun = "column" if len(lacking) == 1 else "columns"
            raise ValueError(f"reward function {fn.name!r} takes {noun} {', '.join(map(repr, lacking))}, which the "
                             f"prompts data lacks (its columns: {', '.join(available) or 'none'}); add the "
                             f"{noun} or give the parameter a default")


# ------------------------------------------------------------------------------------------------ calling


def call_reward_function(fn: RewardFunction, prompts: list, completions: list, completion_ids: list[list[int]],
                         columns: dict[str, list]) -> list[float | None]:
    """``fn(prompts=..., completions=..., completion_ids=..., **columns)`` as TRL calls it, passing only the
    keywords it accepts (all of them when it takes ``**kwargs``); the result checked, one float or None a row."""
    rows = len(prompts)
    for key, values in columns.items():
        if len(values) != rows:
            raise ValueError(f"column {key!r} has {len(values)} values for {rows} completions")
    offered = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
               **{k: v for k, v in columns.items() if k not in NOT_COLUMNS}}
    # A built-in's bound options win over same-named columns.
    bound = set(fn.function.keywords) if isinstance(fn.function, functools.partial) else set()
    keywords = {k: v for k, v in offered.items() if k not in bound and (fn.takes_kwargs or k in fn.parameters)}
    try:
        result = fn.function(**keywords)
        if inspect.isawaitable(result):  # TRL accepts async reward functions (remote judges, sandboxes)
            result = asyncio.run(_awaited(result))
    except Exception as error:  # noqa: BLE001 - the user's failure, named as theirs, the original chained
        raise ValueError(f"reward function {fn.name!r} raised {type(error).__name__}: {_line(error)}") from error
    return checked(fn.name, result, rows)


async def _awaited(awaitable) -> Any:
    return await awaitable


def checked(name: str, result: Any, rows: int) -> list[float | None]:
    """``result`` as one float or None per row, or one line saying what is wrong with it."""
    values = _as_list(name, result)
    if len(values) != rows:
        raise ValueError(f"reward function {name!r} returned {len(values)} values for {rows} completions")
    return [_as_number(name, value, row) for row, value in enumerate(values)]


def _as_list(name: str, result: Any) -> list:
    if isinstance(result, (list, tuple)):
        return list(result)
    if hasattr(result, "ndim") and hasattr(result, "tolist"):  # a torch tensor or numpy array
        if result.ndim != 1:
            raise ValueError(f"reward function {name!r} returned an array of shape {tuple(result.shape)}: return "
                             "one value per completion (a list or a 1-D array)")
        return result.tolist()
    raise ValueError(f"reward function {name!r} returned a {type(result).__name__}: return a list with one number "
                     "(or None) per completion")


def _as_number(name: str, value: Any, row: int) -> float | None:
    if value is None:
        return None
    # numbers.Real covers bool, int, float and numpy's integer and floating scalars; numpy's bool is apart.
    if isinstance(value, (numbers.Real, np.bool_)):
        return float(value)  # NaN and inf pass: the trainer's non-finite guard counts them
    raise ValueError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for row {row}: "
                     "return a number or None")
