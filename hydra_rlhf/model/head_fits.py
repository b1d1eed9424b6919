"""Fitting the scalar heads to convergence on fixed features, after Hydra-SFT's training steps: the reward head
(Bradley-Terry, which is logistic regression on feature differences) and the start of PPO's value head (least
squares on the final hidden states). Both are solved, not stepped: a short run's optimizer steps leave them far off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def fit_reward_head(head: nn.Linear, chosen: torch.Tensor, rejected: torch.Tensor,
                    l2_grid=(0.01, 0.1, 1.0), folds: int = 5) -> dict:
    """Fit the reward head to convergence on fixed features: Bradley-Terry is logistic regression on the feature
    difference, so L-BFGS solves it in seconds where a short run's Adam steps leave it far off (on the demo
    pairs, 50 steps leave the training loss at 0.65). Features are standardised; the L2 strength is picked by
    k-fold cross-validation on the training pairs. The bias cancels in every pair and is set to zero."""
    scale = torch.cat([chosen, rejected]).std(0).clamp(min=1e-6)
    diff = ((chosen - rejected) / scale).double()
    fold_of = torch.arange(len(diff)) % folds

    def solve(x, l2):
        weight = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = F.softplus(-(x @ weight)).mean() + l2 * weight.square().sum()
                loss.backward()
            return loss

        optimizer.step(closure)
        return weight.detach()

    def held_out_accuracy(l2):
        hits = [((diff[fold_of == k] @ solve(diff[fold_of != k], l2)) > 0).double().mean() for k in range(folds)]
        return float(torch.stack(hits).mean())

    scores = {l2: held_out_accuracy(l2) for l2 in l2_grid} if len(diff) >= 2 * folds else {l2_grid[1]: float("nan")}
    best = max(scores, key=lambda l2: (scores[l2], -l2))
    weight = solve(diff, best) / scale.double()
    head.weight.copy_(weight.to(head.weight.dtype).unsqueeze(0))
    head.bias.zero_()
    return {"l2": best, "cv_accuracy": scores[best], "pairs": len(diff)}


class CriticStart:
    """The start of PPO's value head, fitted from the final hidden states the training forwards compute anyway.

    The value head reads the final hidden states at each state (the position before each response token) and
    predicts the return, which at the start of RL is the reward head's score. Where the reward head reads those
    same states, the value head starts as its copy; where it reads an inner layer (``reward_layer``), its weights
    mean nothing there, and a critic started at zero guesses nothing for its first iterations. So each sequence's
    score is regressed on its states' features (ridge least squares, a bias column included). The regression needs
    only sums, gathered at every step: the Gram matrix over states and each sequence's summed features."""

    def __init__(self, hidden_size: int, ridge: float = 1e-2):
        self.gram = torch.zeros(hidden_size + 1, hidden_size + 1, dtype=torch.float64)
        self.summed: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (pair, chosen's, rejected's) summed features
        self.ridge = ridge

    @torch.no_grad()
    def add(self, pair_indices: list[int], final_hidden: torch.Tensor, labels_mask: torch.Tensor) -> None:
        """One training batch: [chosen; rejected] final hidden states (2P, T, H) and response masks (2P, T)."""
        states = labels_mask[:, 1:].to(torch.float64)[..., None]  # position t is the state before token t + 1
        x = torch.cat([final_hidden[:, :-1].double(), torch.ones_like(states)], -1) * states
        self.gram += torch.einsum("bti,btj->ij", x, x).cpu()
        chosen, rejected = x.sum(1).cpu().chunk(2)
        self.summed += zip(pair_indices, chosen, rejected)

    @torch.no_grad()
    def fit(self, head: nn.Linear, score) -> dict:
        """Set ``head`` to the ridge fit; ``score(pairs)`` gives the reward head's (chosen, rejected) scores of
        those training pairs. Returns the fit's size and its R^2 over the states it saw."""
        pairs, chosen, rejected = zip(*self.summed)
        summed = torch.cat([torch.stack(chosen), torch.stack(rejected)])
        targets = torch.cat(score(list(pairs))).double().cpu()
        counts = summed[:, -1]  # the bias column sums to each sequence's number of states
        diagonal = torch.diagonal(self.gram).clone()
        diagonal[-1] = 0.0  # the bias is not shrunk
        moment = summed.T @ targets  # X^T y: every state of a sequence has that sequence's score as its target
        weight = torch.linalg.solve(self.gram + self.ridge * torch.diag(diagonal), moment)
        residual = (counts * targets.square()).sum() - 2 * weight @ moment + weight @ self.gram @ weight
        mean = (counts * targets).sum() / counts.sum()
        total = (counts * (targets - mean).square()).sum()
        head.weight.copy_(weight[:-1].to(head.weight.dtype).unsqueeze(0))
        head.bias.fill_(float(weight[-1]))
        return {"sequences": len(targets), "states": int(counts.sum()), "r2": float(1 - residual / total)}
