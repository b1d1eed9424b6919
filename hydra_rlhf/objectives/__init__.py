"""The objective axis: PPO (with a critic), RLOO, GRPO and online DPO (critic-free), one config key
(``objective``). Each module holds its math as pure functions and an ``Objective`` that the trainer calls in
stage 4 (``targets``) and stage 5 (``loss``); ``functional.py`` holds the math they share. The one registry of
objectives (which needs a critic, how many samples per prompt, which class implements it) is
``hydra_rlhf.layout.OBJECTIVES``."""

from __future__ import annotations

import importlib

from ..layout import objective_info
from .base import Objective, Targets


def make_objective(config) -> Objective:
    """The objective ``config.objective`` names, bound to the run's config."""
    info = objective_info(config.objective)  # a one-line error for an unknown name
    module, name = info.implementation.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)(config, info)


__all__ = ["Objective", "Targets", "make_objective"]
