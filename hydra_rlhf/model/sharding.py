"""The fifth axis: how a multi-process run holds the one base (``sharding``), through torch's FSDP2.

    sharding  processes  what each rank holds                        gradients averaged by
    none      1          the whole model                             (nothing to average)
    none      N          a replica (FSDP2 on an (N, 1) mesh: HSDP    FSDP2's all-reduce over the replicas
                         whose shards are whole)
    fsdp2     N          1/N of every base, adapter and value head   FSDP2's reduce-scatter
                         (``fully_shard`` per decoder layer + root)

Both multi-process layouts go through ``distribute``: one ``fully_shard`` per decoder layer of every base, and the
HydraModel itself as the root unit, holding the embeddings, final norm, LM head and the value head (its gradient is
reduced with the rest; a head outside every unit would let the ranks drift apart silently). The frozen reward head
stays a plain replicated tensor (``ignored_params``): it never changes, and the heads file stays one ``save_file``.

The HydraModel never calls its own ``forward``: roles call the decoder, the LM head and the heads directly. So its
public entry points (``generate``, ``frozen_scores``, ``policy_scores``, ``values``, ``rewards``) are registered as
FSDP forward methods: each gathers the root's parameters before it runs and hooks the backward that reduces its
gradients. peft's ``set_adapter`` / ``disable_adapter`` work on the sharded modules as they are: the Hydra
adapters-off pass (reference and reward in one forward) survives sharding.

Generation: ranks that finish sampling early keep stepping (``synced_gpus``), because every decode step gathers
each layer's shards from every rank.

Saving gathers the trained weights to full tensors (``trained_state``), so a checkpoint holds the same files as a
one-process run's and resumes on any number of ranks; loading slices the full tensors back into each rank's shard
(a load-state-dict pre-hook on every sharded module).
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from torch import nn

from ..layout import check_sharding
from .loading import decoder_layers

logger = logging.getLogger(__name__)

# HydraModel methods that read the root unit's parameters: each is an FSDP forward.
ENTRY_POINTS = ("generate", "frozen_scores", "policy_scores", "values", "rewards")
# How long a finished process lets its process groups' threads free their last tensors (``end_process_group``). A
# 2-process script that holds the interpreter lock from its last collective to shutdown aborted in 11 of 20 runs
# without the wait and in none of 20 with it; 50 ms already ended every abort of another such script (40 runs).
THREADS_FINISH_SECONDS = 0.2


def requested_sharding(config) -> str:
    """The sharding a run (``config``, an RLConfig) asks for: its ``sharding``, or ``fsdp2`` under an ``accelerate
    launch`` with an FSDP config (accelerate's own plugin would leave a CPU run unsharded without a word, so the
    project applies FSDP2 itself, on every device)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and config.sharding == "none":
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ValueError("accelerate's FSDP config asks for FSDP version 1: set fsdp_version: 2 in it "
                             "(recipes/accelerate/fsdp2.yaml), or sharding fsdp2 without an FSDP config.")
        return "fsdp2"
    return config.sharding


def load_device(config, processes: int, device: torch.device) -> torch.device:
    """Where a run's bases load: on the host when they will be sharded (``fully_shard`` then moves each rank's
    shard to ``device`` a layer at a time, so the whole base never has to fit one card; safetensors files are
    memory-mapped, so the processes of one machine share one copy in its page cache), else on ``device``."""
    return torch.device("cpu") if processes > 1 and requested_sharding(config) == "fsdp2" else device


def prepare(model: nn.Module, config, processes: int, device: torch.device) -> str:
    """Wrap ``model`` for a run (``config``, an RLConfig) of ``processes`` data-parallel processes; returns the
    sharding it got (``requested_sharding``)."""
    sharding = requested_sharding(config)
    check_sharding(sharding, config.generation_backend, config.fusion, config.async_generation,
                   model.config.quantization)
    if processes == 1:
        if sharding != "none":
            logger.warning("sharding %s on one process: the whole base stays on it (nothing to shard across); "
                           "launch N processes with torchrun or accelerate launch to hold 1/N each.", sharding)
        return "none"
    distribute(model, sharding, processes, device)
    if sharding == "fsdp2":
        check_sharded(model)
    return sharding


def memory_log_name(rank: int) -> str:
    """Where each process of a run writes its memory per stage: ``memory.jsonl`` (rank 0, the run's table), and
    ``memory-rank<r>.jsonl`` for the others (a sharded rank's memory is its own, not rank 0's)."""
    return "memory.jsonl" if rank == 0 else f"memory-rank{rank}.jsonl"


def check_sharded(model: nn.Module) -> None:
    """Refuse a run that asked for sharding but holds whole replicas (every decoder weight must be split)."""
    from torch.distributed.tensor import Shard

    for name, param in model.named_parameters():
        split = _is_dtensor(param) and any(isinstance(placement, Shard) and param.device_mesh.size(i) > 1
                                           for i, placement in enumerate(param.placements))
        if not split and name.startswith("bases.") and "lora_" not in name:
            raise RuntimeError(f"sharding fsdp2 was asked for, but {name} is whole on every rank (a replica): "
                               "the run would not hold 1/N of the base.")


def is_distributed(model: nn.Module) -> bool:
    """Whether ``distribute`` wrapped this model (its parameters are DTensors)."""
    return getattr(model, "sharding_mesh", None) is not None


def distribute(model: nn.Module, sharding: str, world: int, device: torch.device) -> None:
    """Wrap ``model`` (a HydraModel) in place for a ``world``-process run: sharded (``fsdp2``) or replicated
    (``none``). Call it before building the optimizer: the parameters become DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if sharding == "fsdp2":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    else:  # HSDP with shards of one: every rank keeps the whole model, gradients are all-reduced (DDP's work)
        mesh = init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    for base in model.bases.values():
        for layer in decoder_layers(base, "sharding fsdp2"):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.reward_head.parameters()))
    model.reward_head.to(device)  # FSDP moved every other weight to the mesh's device; this one it ignores
    for name in ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    # Scores come back as views ((B, R) slices of (B, T) tensors); FSDP2 warns that an in-place op on one would
    # skip its backward hook. None of the objectives writes into a score in place (they build new tensors).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for module in model.modules():
        if any(_is_dtensor(p) for p in module.parameters(recurse=False)):
            module.register_load_state_dict_pre_hook(_full_tensors_to_shards)
    model.sharding_mesh = mesh


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full_tensors_to_shards(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a full tensor read from a file becomes this rank's shard of it (no communication:
    every rank read the same file), so peft's and torch's loaders work on a sharded module unchanged."""
    from torch.distributed.tensor import distribute_tensor

    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state_dict and _is_dtensor(param) and not _is_dtensor(state_dict[key]):
            full = state_dict[key].to(device=param.device, dtype=param.dtype)
            state_dict[key] = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every rank calls it), or ``tensor`` itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over a module's state, adapters excluded, sharded or not (a collective where it is sharded: every
    rank calls it). trl's ``hash_module`` cannot skip the adapters (which train) and goes through numpy, which has no
    bfloat16; raw bytes cover every dtype, 4-bit storage included. The bytes are hashed where they lie (a uint8
    view, read through the buffer protocol): no copy of a weight is made on the CPU, where a copy of the largest
    (the embedding, 113 MB for SmolLM2-135M in fp32) would add to the process's peak."""
    import hashlib

    state = model.state_dict()
    # A sharded 4-bit weight's quantization state is not in state_dict (it hangs on the weight, which FSDP replaced
    # by its shard); the layer keeps it whole, so a sharded base hashes as the same base on one process does.
    for name, module in model.named_modules():
        quant_state = getattr(module, "quant_state", None)
        if hasattr(quant_state, "as_dict"):
            for key, value in quant_state.as_dict(packed=True).items():
                state.setdefault(f"{name}.weight.{key}", value)
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if "lora_" in name:
            continue
        tensor = full_tensor(tensor.detach()).cpu().contiguous()  # a shard's whole tensor; a CPU weight as it is
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def trained_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every trainable weight as a full CPU tensor, by name (the same names as ``model.named_parameters()``), on
    rank 0; an empty dict on the other ranks; None for a model that is not distributed (read its modules). A
    collective: every rank calls it."""
    if not is_distributed(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    # (a weight tied to a frozen one, the LM head's, comes back too: not trained, not kept)
    return {name: value for name, value in get_model_state_dict(model, options=options).items() if name in trainable}


def optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's state keyed by parameter name, its tensors whole (a collective where distributed): the
    same file from any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=is_distributed(model))
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """``optimizer_state``'s dict back into ``optimizer``, sliced into this rank's shards; a checkpoint written
    before state was keyed by name (integer keys) loads as it was saved."""
    if all(isinstance(key, int) for key in state.get("state", {})):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def end_process_group(accelerator=None) -> None:
    """End the run's process group (with accelerate's trackers when given ``accelerator``), then let its worker
    threads finish before Python shuts down.

    A process group's worker threads free each collective's tensors after the caller has its result, and freeing a
    tensor Python has seen takes the interpreter lock. A rank with nothing left to do can reach interpreter shutdown
    first: the thread then dies inside a C++ frame and the finished process aborts ("terminate called without an
    active exception"; 5 of 90 two-process CPU runs of the sharding benchmark here). ``destroy_process_group`` does
    not join those threads while a sharded model's mesh still refers to the group (torch's DTensor caches keep
    it to the end), so this waits with the lock released."""
    import time

    running = torch.distributed.is_available() and torch.distributed.is_initialized()
    if accelerator is not None:
        accelerator.end_training()
    elif running:
        torch.distributed.destroy_process_group()
    if running:
        time.sleep(THREADS_FINISH_SECONDS)
