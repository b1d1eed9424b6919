"""Several reward sources, one score per completion: the weighted sum TRL's ``GRPOTrainer`` computes.

The sources are the Hydra reward head (scores the caller already has), reward functions, and an external reward
model (any callable ``model(prompts, completions) -> list[float]``, see ``reward_model.py``). Each gives one value a
row or None ("does not apply"), held as NaN in the per-source scores; the combined score sums ``weight * value``
over the sources that gave a value (as TRL does), so a None neither rewards nor punishes. Unlike TRL, a NaN or inf a
source *returned* stays in the sum: the trainer's non-finite guard then skips and counts that update instead of
training on a silently smaller reward. A row no source applies to scores 0 and is counted (``reward/none_applied``) so a spec that never fires is seen, not silently trained on. A source of weight 0 is
not computed at all: no call, no head read. No model code here: the caller owns devices and models.
"""

from __future__ import annotations

import math

import torch

from .functions import RewardFunction, call_reward_function, checked

HEAD = "head"
REWARD_MODEL = "reward_model"


class RewardSources:
    """The configured reward sources and their weights; :meth:`score` combines them for one batch."""

    def __init__(self, functions: list[RewardFunction], weights: list[float] | None = None, head_weight: float = 0.0,
                 reward_model=None, reward_model_weight: float = 1.0):
        weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(functions):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(functions)} reward functions; give "
                             "one weight per function, in the same order.")
        self.reward_model = reward_model  # the caller's, e.g. for the profiler's resident bytes
        self.sources: list[tuple[str, float, object]] = []  # (name, weight, what gives the values); weight != 0
        named = [(HEAD, float(head_weight), None), *((fn.name, w, fn) for fn, w in zip(functions, weights))]
        if reward_model is not None:
            named.append((REWARD_MODEL, float(reward_model_weight), reward_model))
        _check_names([name for name, _, _ in named])
        for name, weight, source in named:
            if not math.isfinite(weight):
                raise ValueError(f"the weight of reward source {name!r} is {weight}; give a finite number.")
            if weight != 0.0:
                self.sources.append((name, weight, source))
        if not self.sources:
            raise ValueError("every reward source has weight 0: give a reward function, a reward model or a non-zero "
                             "reward head weight.")

    @property
    def needs_head(self) -> bool:
        """Whether :meth:`score` reads the Hydra head's scores (the caller computes them only then)."""
        return any(name == HEAD for name, _, _ in self.sources)

    @property
    def names(self) -> list[str]:
        """The sources that are computed, in order (head first, reward model last)."""
        return [name for name, _, _ in self.sources]

    def score(self, head_scores: torch.Tensor | None, prompts: list, completions: list, completion_ids: list[list[int]],
              columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(combined (B,), {source name: values (B,), NaN where it gave None}), float32 on ``head_scores``' device
        (the CPU without one). A None leaves the source out of that row's sum; a NaN or inf a source returned
        stays in it, so the trainer's non-finite guard sees (and counts) it instead of a silently smaller reward."""
        device = head_scores.device if head_scores is not None else torch.device("cpu")
        per_source, combined = {}, torch.zeros(len(prompts), device=device)
        for name, weight, source in self.sources:
            values, applied = self._values(name, source, head_scores, prompts, completions, completion_ids, columns,
                                           device)
            per_source[name] = values
            combined = combined + torch.where(applied, weight * values, torch.zeros_like(values))
        return combined, per_source

    def _values(self, name, source, head_scores, prompts, completions, completion_ids, columns,
                device) -> tuple[torch.Tensor, torch.Tensor]:
        """(values (B,) with NaN where the source gave None, applied (B,) bool: it gave a value)."""
        rows = len(prompts)
        if name == HEAD:
            if head_scores is None or head_scores.shape != (rows,):
                shape = None if head_scores is None else tuple(head_scores.shape)
                raise ValueError(f"the reward head has a weight, so score() needs its scores, shape ({rows},); got "
                                 f"{shape}.")
            scores = head_scores.detach().float()
            return scores, torch.ones_like(scores, dtype=torch.bool)
        if isinstance(source, RewardFunction):
            values = call_reward_function(source, prompts, completions, completion_ids, columns)
        else:  # the external reward model: its own (not a user's) failures are not reworded
            values = checked(name, source(prompts, completions), rows)
        applied = torch.tensor([v is not None for v in values], dtype=torch.bool, device=device)
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32, device=device), applied

    @staticmethod
    def metrics(per_source: dict[str, torch.Tensor]) -> dict[str, float]:
        """``reward/<name>/mean`` and ``/std`` over the rows each source applied to (left out where it applied to
        none), and ``reward/none_applied``: how many rows no source applied to."""
        out: dict[str, float] = {}
        for name, values in per_source.items():
            applied = values[~torch.isnan(values)].double()
            if applied.numel():
                out[f"reward/{name}/mean"] = applied.mean().item()
                out[f"reward/{name}/std"] = applied.std().item() if applied.numel() > 1 else 0.0
        if per_source:
            stacked = torch.stack(list(per_source.values()), dim=1)
            out["reward/none_applied"] = float(torch.isnan(stacked).all(dim=1).sum().item())
        return out


def _check_names(names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"reward sources share the name {repeated[0]!r} (names key the metrics; 'head' and "
                         "'reward_model' are taken); make them unique, e.g. with rewards.unique_names.")
