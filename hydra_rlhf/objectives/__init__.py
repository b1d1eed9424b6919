"""The objective axis: PPO (with a critic), RLOO, GRPO and online DPO (critic-free), one config key
(``objective``). Each module holds its math as pure functions and an ``Objective`` that the trainer calls in
stage 4 (targets) and stage 5 (loss). Which objective needs a critic, and how many samples per prompt it
takes by default, is in ``hydra_rlhf.layout.OBJECTIVES``."""

from __future__ import annotations

from ..layout import OBJECTIVES, objective_info
from .base import Objective
from .grpo import GRPO
from .online_dpo import OnlineDPO
from .ppo import PPO
from .rloo import RLOO

_CLASSES = {cls.name: cls for cls in (PPO, RLOO, GRPO, OnlineDPO)}
assert set(_CLASSES) == set(OBJECTIVES), "every objective in layout.OBJECTIVES needs a class here"


def make_objective(config) -> Objective:
    """The objective ``config.objective`` names, bound to the run's config."""
    objective_info(config.objective)  # a one-line error for an unknown name
    return _CLASSES[config.objective](config)


__all__ = ["GRPO", "OnlineDPO", "PPO", "RLOO", "Objective", "make_objective"]
