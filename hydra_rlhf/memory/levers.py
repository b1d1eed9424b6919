"""Memory levers: what is left to cut once Hydra has removed the base copies. Each is one config key, measured by
``hydra-rlhf profile`` and modelled by ``hydra-rlhf estimate`` (flag in brackets, declared in ``memory/arguments.py``);
all are off by default, so a run without them computes exactly what it always did.

* ``logprob_chunk_size`` (``--logprob-chunk-size``): log-probs without whole logits. The LM head, log-softmax,
  the gather of the sampled tokens and the entropy run over chunks of response tokens, each chunk checkpointed
  (recomputed in backward), so no (batch, tokens, vocabulary) tensor ever exists. Cost: one more LM-head matmul
  per training token. Results equal the whole-logits path's (float rounding only).
* ``optim: adamw_bnb_8bit`` (``--optim``): bitsandbytes' 8-bit AdamW, block-wise quantized states (1 byte per
  state element instead of 4); tensors under 4,096 elements (the heads) keep 32-bit states, as bitsandbytes does.
* ``activation_offload`` (``--activation-offload``): the tensors the training forward keeps for backward (with
  gradient checkpointing: each decoder layer's input) go to pinned host memory and come back as backward reaches
  them: torch's ``save_on_cpu`` saved-tensor hooks. CUDA only: on a CPU the host memory is the device memory.
* ``adapter_dtype: compute`` (``--adapter-dtype``): LoRA adapters in the base's compute dtype (bf16 on a GPU)
  instead of fp32: half the adapter, gradient and AdamW bytes, and no fp32 copy of each LoRA input. The heads
  stay fp32 (h + 1 parameters each: nothing to save, and the reward must be exact). Safe in bf16 (fp32's range);
  refused in fp16, whose weights would need loss scaling. An update smaller than bf16's resolution (about 0.4%
  of a weight) is lost, so very small learning rates train slower.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a lever runs, not on import
    import torch
    from torch import nn

from ..config import ADAPTER_DTYPES, OPTIMIZERS
from ..layout import check_adapter_dtype


# ------------------------------------------------------------------------------------------------ log-probs


def response_logprobs(lm_head: nn.Module, states: torch.Tensor, tokens: torch.Tensor, temperature: float,
                      entropy: bool = False, chunk_size: int = 0):
    """(B, R) log pi(token | state) from the final hidden states (B, R, H) that predict ``tokens`` (B, R); with
    ``entropy`` also the (B, R) policy entropy (no grad). ``chunk_size`` > 0: over chunks of that many tokens,
    each recomputed in backward, so at most one chunk's logits exist at a time."""
    if not chunk_size:
        return _token_scores(lm_head, states, tokens, temperature, entropy)
    import torch
    from torch.utils.checkpoint import checkpoint

    rows, width = tokens.shape
    flat_states, flat_tokens = states.reshape(rows * width, -1), tokens.reshape(-1)
    pieces = [checkpoint(_token_scores, lm_head, chunk, chunk_tokens, temperature, entropy, use_reentrant=False)
              for chunk, chunk_tokens in zip(flat_states.split(chunk_size), flat_tokens.split(chunk_size))]
    if not entropy:
        return torch.cat(pieces).view(rows, width)
    return tuple(torch.cat(part).view(rows, width) for part in zip(*pieces))


def _token_scores(lm_head: nn.Module, states: torch.Tensor, tokens: torch.Tensor, temperature: float,
                  entropy: bool):
    """Log-probs of ``tokens`` (and the entropy, without grad) from one block of states. The entropy comes after
    the last tensor saved for backward, so a checkpoint's recomputation stops before it."""
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = lm_head(states).float() / temperature
    logprobs = selective_log_softmax(logits, tokens)
    if not entropy:
        return logprobs
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits.detach())


# ------------------------------------------------------------------------------------------------ optimizer


def make_optimizer(param_groups: list[dict], name: str, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: torch's, or bitsandbytes' 8-bit one (a clear error where it cannot run)."""
    import torch

    from ..errors import check_choice

    check_choice("optim", name, OPTIMIZERS)
    if name == "adamw_torch":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as error:  # e.g. a platform without a bitsandbytes build
        raise RuntimeError(f"optim adamw_bnb_8bit needs bitsandbytes, which does not import here ({error}); "
                           "use optim adamw_torch.") from None
    return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------ activation offload


def activation_offload(enabled: bool, device: torch.device):
    """Context for a forward whose saved tensors should wait for backward in pinned host memory (CUDA); a no-op
    when off or on a CPU, where host memory is the device's own."""
    if not enabled or device.type != "cuda":
        return nullcontext()
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=True)


# ------------------------------------------------------------------------------------------------ adapter dtype


def adapter_torch_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype LoRA weights are kept in: fp32, or the compute dtype (refused for fp16: no loss scaling here)."""
    import torch

    from ..errors import check_choice

    check_choice("adapter_dtype", name, ADAPTER_DTYPES)
    if name == "float32" or compute_dtype == torch.float32:
        return torch.float32
    check_adapter_dtype(name, str(compute_dtype).removeprefix("torch."))
    return compute_dtype


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Every LoRA weight of a peft model to ``dtype``, in place (the frozen base is left as it is)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            module.to(dtype)
