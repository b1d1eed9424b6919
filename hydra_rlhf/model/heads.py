"""The scalar heads of a HydraModel and how they are stored.

Heads live outside peft: peft's ``disable_adapter`` also bypasses ``modules_to_save``, so a head registered that
way would silently fall back to its original copy inside the adapters-off (reference and reward) pass. The
reward head reads the response as Hydra-SFT trained it (``pool_response``, over the final hidden states or those
of an inner layer: ``reading_layer``); the value head starts as its copy where both read the final hidden states.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .loading import decoder_layers

# The reward head (and value head) of a Hydra-SFT or RL checkpoint. In a subfolder: serving engines (vLLM, TGI)
# load every top-level *.safetensors of a model directory as its weights, and a Hydra-SFT checkpoint must load
# there as the plain causal LM it is. Checkpoints written before kept it at the top (LEGACY_HEADS_FILE).
HEADS_FILE = "hydra/heads.safetensors"
LEGACY_HEADS_FILE = "hydra_heads.safetensors"
REWARD_POOLINGS = ("last", "mean", "sum")  # what the reward head reads; stored in the heads file's metadata


def pool_response(hidden: torch.Tensor, response_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, H) features the reward head reads from final hidden states (B, T, H); ``response_mask`` (B, T) marks
    the response tokens (EOS included). ``last``: the last response token, the usual reward-model read.
    ``mean``: the mean over response tokens. ``sum``: their sum, so each token adds its share to the score,
    as a lexicon judge like VADER adds up word valences. On the bundled 135M model both pooled reads generalise
    better from a few hundred pairs than ``last`` (5-fold cross-validated linear probes on the demo pairs: 72%
    against 56%), but a mean can be gamed by a one-word upbeat reply and a sum cannot (docs/results.md)."""
    if pooling == "last":
        last = response_mask.shape[1] - 1 - response_mask.flip(-1).long().argmax(-1)
        return hidden[torch.arange(hidden.shape[0]), last]
    if pooling in ("mean", "sum"):
        weights = response_mask.to(hidden.dtype)[..., None]
        total = (hidden * weights).sum(1)
        return total if pooling == "sum" else total / weights.sum(1).clamp(min=1)
    raise ValueError(f"Unknown reward pooling {pooling!r}: use one of {', '.join(REWARD_POOLINGS)}.")


class _ReadDone(Exception):
    """Raised by a hook to end a forward once the hidden states the reward head reads exist."""


@contextmanager
def reading_layer(decoder: torch.nn.Module, layer: int | None, stop: bool = False):
    """Capture the hidden states after the first ``layer`` decoder layers (0: the token embeddings) of a forward
    run inside the block, into the yielded dict's ``"hidden"``; ``layer`` None captures nothing (the head reads the
    final hidden states, which the forward returns). ``stop``: end the forward there, for a pass that serves only
    the reward head (the layers above are never run); the block's remaining statements are skipped."""
    captured: dict[str, torch.Tensor] = {}
    if layer is None:
        yield captured
        return
    module = decoder.get_input_embeddings() if layer == 0 else decoder_layers(decoder, "reward_layer")[layer - 1]

    def hook(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _ReadDone

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    except _ReadDone:
        pass
    finally:
        handle.remove()


def check_reward_layer(layer: int | None, num_layers: int, where: str) -> None:
    """One line naming ``where`` when ``layer`` is outside 0..num_layers."""
    if layer is not None and not 0 <= layer <= num_layers:
        raise ValueError(f"{where}: reward_layer {layer} is outside 0..{num_layers} (the model has {num_layers} "
                         "layers; 0 reads the token embeddings, empty the final hidden states).")


def heads_path(directory: str | Path) -> Path:
    """Where a checkpoint's heads are: ``HEADS_FILE``, or ``LEGACY_HEADS_FILE`` in one written before the move."""
    directory = Path(directory)
    legacy = directory / LEGACY_HEADS_FILE
    return legacy if legacy.is_file() and not (directory / HEADS_FILE).is_file() else directory / HEADS_FILE


def save_heads(tensors: dict[str, torch.Tensor], directory: str | Path, reward_pooling: str,
               reward_layer: int | None = None) -> None:
    """The heads as safetensors at ``directory / HEADS_FILE``; what the reward head reads (its pooling, and its layer
    where it is not the final one) in the file's metadata."""
    from safetensors.torch import save_file

    path = Path(directory) / HEADS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    layer = {} if reward_layer is None else {"reward_layer": str(reward_layer)}
    save_file(tensors, path, metadata={"reward_pooling": reward_pooling, **layer})


def with_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, with the prefix removed (one head out of a heads file)."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
