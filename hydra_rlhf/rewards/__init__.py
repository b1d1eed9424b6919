"""Reward sources beyond the Hydra reward head, TRL-compatible: reward functions (verifiable rewards, named as
``package.module:function``, ``path/to/file.py:function`` or a built-in), an external sequence-classification reward
model, and their weighted combination with the head.

``functions.py`` resolves, checks and calls reward functions; ``builtins.py`` holds ``accuracy``, ``format`` and
``overlong``; ``reward_model.py`` the external model (transformers is imported when one is loaded); ``combine.py`` the
weighted sum and its metrics.
"""

from .builtins import BUILTINS, DEFAULT_FORMAT_PATTERN, completion_text
from .combine import RewardSources
from .functions import (RewardFunction, call_reward_function, check_columns, describe, resolve_reward_function,
                        resolve_reward_functions, unique_names)
from .reward_model import ExternalRewardModel


__all__ = ["BUILTINS", "DEFAULT_FORMAT_PATTERN", "ExternalRewardModel", "RewardFunction", "RewardSources",
           "call_reward_function", "check_columns", "completion_text", "describe", "resolve_reward_function",
           "resolve_reward_functions", "unique_names"]
