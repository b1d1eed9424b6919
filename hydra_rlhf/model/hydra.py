"""HydraModel: one base model as policy, reference, reward model and critic.

Four modes, one code path (docs/design.md, "The four modes"). Each mode is a *role plan*, read from
``layout.role_plan``: for every role, which base model serves it and which adapter is active there. Everything
else - switching, scoring, saving - reads the plan, so the memory comparison between modes compares layouts,
not implementations. Critic-free objectives (RLOO, GRPO, online DPO) get the plan without the critic role: no
critic adapter, no value head, no value forward.

Heads live outside peft (peft's ``disable_adapter`` would silently swap a ``modules_to_save`` head for its
original copy): ``reward_head`` (frozen; it reads the response as Hydra-SFT trained it, at the last token, averaged or
summed: ``reward_pooling``, from the final hidden states or those of an inner layer: ``reward_layer``, both stored
with the head) and ``value_head`` (trainable, one value per token, initialised from the checkpoint's fitted start or
the reward head where these read the final hidden states, else at zero).

Sequence layout used by every scoring method: ``input_ids`` (B, P + R) holds left-padded prompts of width P
followed by right-padded responses of width R; ``attention_mask`` marks real tokens; ``response_mask``
(B, R) marks real response tokens. Position ids are derived from the mask, as ``generate`` does.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import DTYPES, HydraModelConfig
from ..memory.levers import activation_offload, response_logprobs
from ..layout import FROZEN_ROLES, FULL, ROLES, TRAINABLE_ROLES, adapter_names, base_names, role_plan
from ..memory.profiler import storage_bytes
from .heads import HEADS_FILE, check_reward_layer, heads_path, pool_response, reading_layer, save_heads, with_prefix
from .loading import MANIFEST_FILE, enable_activation_checkpointing, load_causal_lm, resolve_model, unwrapped
from .lora import with_lora_adapters
from .sharding import weights_fingerprint

logger = logging.getLogger(__name__)

def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported, else fp16 (a T4)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, DTYPES[name])


def _decoder_and_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return unwrapped(model).get_decoder(), unwrapped(model).get_output_embeddings()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, the same ones ``generate`` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HydraModel(nn.Module):
    """Policy, reference, reward model and critic over one (or, for the baselines, 2 or 4) base models."""

    def __init__(self, bases: dict[str, nn.Module], mode: str, hidden_size: int, config: HydraModelConfig,
                 critic: bool = True):
        super().__init__()
        self.mode, self.config = mode, config
        self.plan = role_plan(mode, critic)
        self.bases = nn.ModuleDict(bases)
        self.reward_head = nn.Linear(hidden_size, 1)
        self.value_head = nn.Linear(hidden_size, 1) if critic else None  # critic-free: no value head at all
        self.reward_head.requires_grad_(False)
        self.reward_pooling = "last"  # replaced by the pooling stored with a trained head
        self.reward_layer: int | None = None  # likewise: None reads the final hidden states
        self._forward_adapter: str | None = None  # the adapter a checkpointed layer's forward runs under

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: HydraModelConfig, device: str | torch.device = "cpu", seed: int = 0,
                    critic: bool = True, reward_head: bool = True,
                    load_device: str | torch.device | None = None) -> "HydraModel":
        """Load the base(s) the mode's role plan names, add its adapters, and read the heads from the base's
        ``hydra/heads.safetensors`` (a Hydra-SFT checkpoint) when present. ``seed`` fixes adapter and head init, so
        every process starts identical. ``critic=False`` (RLOO, GRPO, online DPO) builds no critic adapter, base or
        value head. ``reward_head=False``: the reward comes from other sources, so a base without a head is fine.
        ``load_device``: where the bases load, if not on ``device`` (a sharded run's load on the host; FSDP2 then
        moves each rank's shard to ``device``, a layer at a time)."""
        device = torch.device(device)
        dtype = resolve_dtype(config.dtype, device)
        load = lambda path: load_causal_lm(  # noqa: E731
            path, dtype=dtype, quantization=config.quantization, device=load_device or device,
            trust_remote_code=config.trust_remote_code)
        plan = role_plan(config.mode, critic)
        reward_path = config.reward_model_path or config.model_name_or_path
        policy_base = _frozen(load(config.model_name_or_path))  # the reference's weights
        torch.manual_seed(seed)
        adapters, bases = adapter_names(plan), {}
        for name in base_names(plan):
            roles = {role for role, (base, _) in plan.items() if base == name}
            if plan["reference"][0] == name:
                base = policy_base
            elif roles & {"policy", "reference"}:  # full mode's trainable policy copy
                base = load(config.model_name_or_path)
            else:  # the reward model, and the critic that starts from it (full, lora)
                base = load(reward_path)
            if (name, FULL) not in plan.values():
                base = _frozen(base)
            bases[name] = with_lora_adapters(base, adapters[name], config) if name in adapters else base
        model = cls(bases, config.mode, policy_base.config.hidden_size, config, critic=critic)
        model.to_heads_device(device)  # the bases are already placed (bitsandbytes places at load time)
        model.load_reward_head(reward_path, required=reward_head)
        for base in model.bases.values():
            _disable_dropout(base)
            if config.gradient_checkpointing:
                enable_activation_checkpointing(base, use_reentrant=False, context_fn=model._checkpoint_contexts)
        model._remember_trainable()
        if config.activation_offload and device.type != "cuda":
            logger.warning("activation_offload has no effect on %s: host memory is the device memory there.", device)
        return model

    @property
    def has_critic(self) -> bool:
        return "critic" in self.plan

    def heads(self) -> dict[str, nn.Module]:
        """The scalar heads this model has: the reward head, and the value head where there is a critic."""
        return {"reward_head": self.reward_head, **({"value_head": self.value_head} if self.has_critic else {})}

    def to_heads_device(self, device) -> None:
        for head in self.heads().values():
            head.to(device)

    def load_reward_head(self, base_path: str, required: bool = True) -> None:
        """Reward head from a Hydra-SFT checkpoint. The value head (if any) starts as the checkpoint's fitted one
        (``head_fits.CriticStart``), or as the reward head's copy where that reads the final hidden states, or at
        zero: an unbiased first guess that GAE corrects at once, where a random head gives values to unlearn."""
        heads = heads_path(resolve_model(base_path))
        state = self._load_heads(heads) if heads.is_file() else {}
        if state:
            self.reward_head.load_state_dict(with_prefix(state, "reward_head."))
            check_reward_layer(self.reward_layer, self.bases[self.plan["reward"][0]].config.num_hidden_layers, str(heads))
        elif required:
            logger.warning("%s has no %s: the reward head is untrained (random). Run Hydra-SFT first for "
                           "meaningful rewards, or give reward_funcs and set reward_head_weight 0.", base_path,
                           HEADS_FILE)
        if not self.has_critic:
            return
        if "value_head.weight" in state:
            self.value_head.load_state_dict(with_prefix(state, "value_head."))
        elif (state or required) and self.reward_layer is None:
            self.value_head.load_state_dict(self.reward_head.state_dict())
        else:  # no head, or one that reads an inner layer: its weights mean nothing on the final hidden states
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def _remember_trainable(self) -> None:
        # peft's set_adapter() flips requires_grad; we restore this set after every switch.
        self._trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]

    def _restore_trainable(self) -> None:
        wanted = set(self._trainable_names)
        for name, param in self.named_parameters():
            param.requires_grad_(name in wanted)

    # ------------------------------------------------------------------------------------------------ roles

    @contextmanager
    def role(self, name: str):
        """The one place adapters are switched. Yields the module that serves ``name``.

        Frozen roles (reference, reward) run with adapters off under ``torch.no_grad``; the previous adapter
        and the trainable set are restored in ``finally``, also when the body raises.
        """
        if name not in self.plan:
            known = ", ".join(self.plan)
            raise ValueError(f"Role {name!r} is not in this model (its roles: {known}); a critic-free objective "
                             "builds no critic." if name in ROLES else f"Unknown role {name!r}: use one of {known}.")
        base_name, adapter = self.plan[name]
        model = self.bases[base_name]
        release_freed_host_memory()  # what the last pass freed, before this one allocates its own
        with ExitStack() as stack:
            # peft re-runs set_adapter() when adapters are re-enabled, which freezes inactive adapters
            # (seen with bitsandbytes layers): put our trainable set back on every exit.
            stack.callback(self._restore_trainable)
            if name in FROZEN_ROLES:
                stack.enter_context(torch.no_grad())
            if adapter is None and hasattr(model, "disable_adapter"):
                stack.enter_context(model.disable_adapter())
            elif adapter not in (None, FULL):
                stack.enter_context(self._adapter_active(model, adapter))
            yield model

    @contextmanager
    def _adapter_active(self, model, adapter: str):
        """``adapter`` active on ``model`` for the body; the previous adapter and the trainable set come back after."""
        previous, previous_forward = model.active_adapter, self._forward_adapter
        model.set_adapter(adapter)
        self._restore_trainable()
        self._forward_adapter = adapter
        try:
            yield
        finally:
            model.set_adapter(previous)
            self._restore_trainable()
            self._forward_adapter = previous_forward

    def _checkpoint_contexts(self):
        """``torch.utils.checkpoint`` context_fn: backward recomputes a layer after the roles have switched (the
        actor and critic losses share one backward), so replay the adapter the layer's forward used; otherwise
        the critic's layers would be recomputed through the actor adapter and get wrong gradients."""
        adapter = self._forward_adapter
        if adapter is None:
            return nullcontext(), nullcontext()
        model = next(base for base in self.bases.values() if adapter in getattr(base, "peft_config", {}))
        return nullcontext(), self._adapter_active(model, adapter)  # entered at recompute time, in backward

    def _same_pass(self, role_a: str, role_b: str) -> bool:
        """Two roles can share one forward when they use the same base with the same adapter state."""
        return self.plan[role_a] == self.plan[role_b]

    # ------------------------------------------------------------------------------------------------ scoring

    def _hidden(self, model, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, H) final-layer hidden states (after the last norm)."""
        decoder, _ = _decoder_and_lm_head(model)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def _response_logprobs(self, model, hidden, input_ids, prompt_len, temperature, return_entropy=False):
        """(B, R) log pi(a_t | s_t) of the response tokens, from hidden states at the positions predicting them
        (over chunks of ``logprob_chunk_size`` tokens when set)."""
        _, lm_head = _decoder_and_lm_head(model)
        return response_logprobs(lm_head, hidden[:, prompt_len - 1 : -1], input_ids[:, prompt_len:], temperature,
                                 return_entropy, self.config.logprob_chunk_size)

    def _values(self, hidden, prompt_len) -> torch.Tensor:
        """(B, R) V(s_t) for each response step, read where the step's token is predicted."""
        return self.value_head(hidden[:, prompt_len - 1 : -1].float()).squeeze(-1)

    def _rewards(self, hidden, attention_mask, prompt_len: int) -> torch.Tensor:
        """(B,) reward head on the response's pooled hidden states (``reward_pooling``), those ``_reading`` gave."""
        response_mask = attention_mask.clone()
        response_mask[:, :prompt_len] = 0
        return self.reward_head(pool_response(hidden, response_mask, self.reward_pooling).float()).squeeze(-1)

    def _reading(self, model, stop: bool = False, read: bool = True):
        """``reading_layer`` on ``model``'s decoder at ``reward_layer`` (``read`` False: capture nothing)."""
        return reading_layer(_decoder_and_lm_head(model)[0], self.reward_layer if read else None, stop)

    def _reward_hidden(self, model, input_ids, attention_mask) -> torch.Tensor:
        """What the reward head reads, from a forward of its own that stops at ``reward_layer``."""
        with self._reading(model, stop=True) as read:
            read["hidden"] = self._hidden(model, input_ids, attention_mask)  # not reached when the read stopped it
        return read["hidden"]

    def frozen_scores(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0):
        """Reference log-probs (B, R) and rewards (B,). One adapters-off forward where the reference and the
        reward model are the same base (hydra, j-hydra); two forwards otherwise."""
        shared = self._same_pass("reference", "reward")  # the reward is read in the reference's pass
        with self.role("reference") as model, self._reading(model, read=shared) as read:
            hidden = self._hidden(model, input_ids, attention_mask)
            ref_logprobs = self._response_logprobs(model, hidden, input_ids, prompt_len, temperature)
        reward_hidden = read.get("hidden", hidden)
        if not shared:
            with self.role("reward") as model:
                reward_hidden = self._reward_hidden(model, input_ids, attention_mask)
        with torch.no_grad():
            rewards = self._rewards(reward_hidden, attention_mask, prompt_len)
        return ref_logprobs, rewards

    def rewards(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """(B,) reward-model scores of prompt + response sequences (adapters off, reward head)."""
        with self.role("reward") as model:
            return self._rewards(self._reward_hidden(model, input_ids, attention_mask), attention_mask, prompt_len)

    def policy_scores(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                      entropy: bool = False, values: bool = False) -> "PolicyScores":
        """The actor's log-probs of the response tokens, with grad if grad is enabled; with ``entropy`` the
        per-token entropy (no grad); with ``values`` the critic's values (PPO only: a second forward, except in
        j-hydra where actor and critic share one). Evaluation and critic-free objectives pay for no critic pass."""
        device = next(self.parameters()).device
        with activation_offload(self.config.activation_offload and torch.is_grad_enabled(), device):
            with self.role("policy") as model:
                hidden = self._hidden(model, input_ids, attention_mask)
                scores = self._response_logprobs(model, hidden, input_ids, prompt_len, temperature, entropy)
            scores = PolicyScores(*scores) if entropy else PolicyScores(scores)
            if values:
                if not self._same_pass("policy", "critic"):
                    with self.role("critic") as model:
                        hidden = self._hidden(model, input_ids, attention_mask)
                scores.values = self._values(hidden, prompt_len)
        return scores

    def values(self, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """(B, R) the critic's values of each response step; with grad where enabled (``critic_warmup``)."""
        with self.role("critic") as model:
            return self._values(self._hidden(model, input_ids, attention_mask), prompt_len)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, role: str = "policy", **generation_kwargs) -> torch.Tensor:
        """Sample with the policy (or ``role="reference"``: the starting policy); returns (B, P + R) sequences."""
        with self.role(role) as model:
            was_training = model.training
            model.eval()  # KV cache on; gradient checkpointing only applies in train mode
            try:
                return model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
            finally:
                model.train(was_training)

    # ---------------------------------------------------------------------------------------------- accounting

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimiser group: ``actor`` (the policy's adapter or full model) and, with a
        critic, ``critic`` (the critic's adapter or full model, and the value head). A shared adapter (j-hydra)
        counts as actor."""
        groups: dict[str, list[nn.Parameter]] = {"actor": []}
        if self.has_critic:
            groups["critic"] = [*self.value_head.parameters()]
        seen = {id(p) for params in groups.values() for p in params}
        for role, group in (("policy", "actor"), ("critic", "critic")):
            if role not in self.plan:
                continue
            base_name, adapter = self.plan[role]
            for name, param in self.bases[base_name].named_parameters():
                owned = adapter == FULL or f".{adapter}." in name
                if owned and param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    groups[group].append(param)
        return groups

    def base_parameters(self) -> list[nn.Parameter]:
        """Frozen base weights: everything but adapters and heads (includes full-mode trainable copies)."""
        return [p for name, p in self.named_parameters()
                if "lora_" not in name and not name.startswith(tuple(self.heads()))]

    def base_copies(self) -> int:
        """How many copies of the base weights are in memory, counted from distinct parameter storages."""
        first_base = next(iter(self.bases.values()))
        one_base = storage_bytes(p for n, p in first_base.named_parameters() if "lora_" not in n)
        return round(storage_bytes(self.base_parameters()) / one_base)

    def frozen_bases(self) -> dict[str, nn.Module]:
        """The base models whose weights must never change (the ones adapters sit on, or frozen copies)."""
        trainable_bases = {base for base, adapter in self.plan.values() if adapter == FULL}
        return {name: base for name, base in self.bases.items() if name not in trainable_bases}

    def frozen_fingerprint(self) -> dict[str, str]:
        """sha256 of every frozen base's weights (adapters excluded) and of the reward head."""
        prints = {"reward_head": weights_fingerprint(self.reward_head)}
        prints.update({name: weights_fingerprint(base) for name, base in self.frozen_bases().items()})
        return prints

    # ---------------------------------------------------------------------------------------------- save/load

    def save_pretrained(self, directory: str | Path, trained_state: dict | None = None) -> None:
        """Adapters in standard peft layout (``<base>/<adapter>/adapter_model.safetensors``, loadable with
        ``PeftModel.from_pretrained(base, path)``), heads as safetensors, full-mode trainable models with
        ``save_pretrained``, and a manifest naming base and mode. ``trained_state``: the trainable weights gathered
        to full tensors by name (a sharded model's, ``sharding.trained_state``); None reads them from the modules."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for base_name, adapter in self._trained_parts():
            base = self.bases[base_name]
            prefix = f"bases.{base_name}."
            state = None if trained_state is None else {
                key[len(prefix):]: value for key, value in trained_state.items() if key.startswith(prefix)}
            if adapter == FULL:
                base.save_pretrained(directory / base_name, state_dict=state)
            else:
                base.save_pretrained(directory / base_name, selected_adapters=[adapter], state_dict=state)
        heads = {f"{name}.{k}": (trained_state or {}).get(f"{name}.{k}", v)
                 for name, head in self.heads().items() for k, v in head.state_dict().items()}
        save_heads({k: v.contiguous() for k, v in heads.items()}, directory, self.reward_pooling, self.reward_layer)
        config = asdict(self.config)
        for key in ("model_name_or_path", "reward_model_path"):  # a relative path breaks from another directory
            if config[key] and Path(config[key]).exists():
                config[key] = str(Path(config[key]).resolve())
        manifest = {"format": 1, "mode": self.mode, "config": config, "plan": self.plan}
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "HydraModel":
        """Rebuild from ``save_pretrained`` output: base(s) from the manifest, then the saved trained parts."""
        manifest = read_manifest(directory)
        # reward_head=False: the heads are the checkpoint's (load_trained), so a base without one is no warning
        model = cls.from_config(HydraModelConfig(**manifest["config"]), device=device,
                                critic="critic" in manifest["plan"], reward_head=False)
        model.load_trained(directory)
        return model

    def load_trained(self, directory: str | Path) -> None:
        """Load saved adapters, full-mode trainable weights and heads into this model, in place."""
        from safetensors.torch import load_file, load_model

        directory = Path(directory)
        for base_name, adapter in self._trained_parts():
            base = self.bases[base_name]
            if adapter == FULL:
                load_model(base, directory / base_name / "model.safetensors", strict=False)
            else:
                from peft import set_peft_model_state_dict

                state = load_file(directory / base_name / adapter / "adapter_model.safetensors")
                set_peft_model_state_dict(base, state, adapter_name=adapter)
        heads = self._load_heads(heads_path(directory))
        for name, head in self.heads().items():
            head.load_state_dict(with_prefix(heads, f"{name}."))
        self._restore_trainable()

    def _trained_parts(self) -> list[tuple[str, str]]:
        """(base, adapter or FULL) of each trainable role, once each (j-hydra's shared adapter serves two)."""
        return list(dict.fromkeys(self.plan[role] for role in TRAINABLE_ROLES if role in self.plan))

    def _load_heads(self, path: Path) -> dict[str, torch.Tensor]:
        """The tensors of a heads file; its metadata sets ``reward_pooling`` (files without it read ``last``) and
        ``reward_layer`` (files without it read the final hidden states)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as heads:
            metadata = heads.metadata() or {}
            self.reward_pooling = metadata.get("reward_pooling", "last")
            layer = metadata.get("reward_layer")
            self.reward_layer = None if layer is None else int(layer)
            return {key: heads.get_tensor(key) for key in heads.keys()}


# --------------------------------------------------------------------------------------------------- helpers


@dataclass
class PolicyScores:
    """What ``HydraModel.policy_scores`` returns. R = response width."""

    logprobs: torch.Tensor  # (B, R) log pi(a_t | s_t), with grad when grad is on
    entropy: torch.Tensor | None = None  # (B, R) policy entropy per step, no grad (when asked)
    values: torch.Tensor | None = None  # (B, R) V(s_t) from the critic (when asked; PPO only)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library is another (macOS, musl)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_host_memory() -> None:
    """Give the host memory that freed tensors left in glibc's heap back to the system. glibc keeps freed blocks
    below its mmap threshold - which rises to 32 MiB as large tensors come and go - for reuse, so the generation's
    key-value caches or a backward's activations stay in the process's RSS through the next pass and add to its peak
    (about 40 MB of the GRPO arithmetic recipe's peak RSS on the bundled model). Trimming costs a heap walk, a few
    milliseconds; it changes no tensor. Lowering the mmap threshold instead would cut more, but doubles the CPU
    generation's time (every key-value cache step maps fresh pages)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _frozen(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False)


def _disable_dropout(model: nn.Module) -> None:
    """Every dropout off, as trl's ``disable_dropout_in_model`` does (not imported: trl.trainer.utils brings
    ``datasets`` with it, ~80 MB of a CPU run's RSS)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0


def read_manifest(directory: str | Path) -> dict:
    """The manifest ``save_pretrained`` writes (mode, model config, role plan); a one-line error if it is absent."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a HydraModel checkpoint: {MANIFEST_FILE} is missing "
                                "(a PPO run keeps its checkpoints in <output_dir>/checkpoints/iter-*).")
    return json.loads(path.read_text())
