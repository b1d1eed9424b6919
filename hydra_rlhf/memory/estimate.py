"""Predict the per-stage peak memory of one PPO iteration from a model's config alone: no weights, no torch.

    hydra-rlhf estimate --preset llama-3.1-8b --quant 4bit --batch-size 8 --gradient-checkpointing

**What is counted** is what ``hydra-rlhf profile`` measures: live tensor bytes (CUDA ``max_memory_allocated``,
or live tensor storages on CPU), per stage, including everything that persists across stages (weights,
adapters, optimizer state, the rollout). The CUDA context, cuBLAS workspaces and allocator fragmentation are
not tensors; the GPU table subtracts a fixed reserve for them from each card instead (``CUDA_RESERVED_BYTES``).

**What is modelled** is this toolkit's code path, read from hydra_model.py, rollout.py and trainer.py:

* ``HydraModel._hidden`` runs the decoder with ``use_cache=False``; the LM head is applied to the response
  positions only, upcast with ``.float()`` and divided by the temperature (a new fp32 tensor even at 1.0), then
  trl's ``selective_log_softmax`` (row-wise logsumexp: the scaled logits are the only vocab-sized tensor it
  keeps for backward) and ``entropy_from_logits`` (no grad, 128-row chunks).
* ``policy_scores`` runs the actor forward, then the critic forward (one shared forward in j-hydra); the trainer
  sums both losses and calls ``backward`` once, so both graphs are alive together at the start of backward.
* AdamW states are created at the first step and live from then on (so in every stage of iteration 2+, which
  is the iteration the profiler's per-stage maximum reports); gradients are set to ``None`` after every step,
  so they exist only inside ``train``.

Notation in every comment: B batch, m minibatch, P prompt_len, G gen_len, T = P + G, N tokens in one forward
(B*T or m*T), L layers, h hidden, q = heads*head_dim, kv = kv_heads*head_dim, I intermediate, V vocab,
r LoRA rank, a bytes per element of the compute dtype, and 4 = fp32 (adapters, heads, logits).

**Calibration.** The activation terms are structural (which tensors autograd saves, read from the code of
transformers' Llama, peft's LoRA layer, bitsandbytes and trl), plus the few measured constants in CAPITALS
below. Checked against the toolkit's own profiler (``profile_mode``, CPU, fp32, live tensor storages) on the
bundled SmolLM2-135M (hydra at batch 8, 64 + 32 tokens; full, lora and hydra with gradient checkpointing at
batch 4, 32 + 32 tokens): every stage within 3%; the measurements are pinned in tests/test_estimate.py.
``benchmarks/estimate_accuracy.py`` repeats the check on demand (with mixed-length prompts left-padded to
``prompt_len``, hydra at batch 1 and 4, lora, j-hydra: worst stage 0.7%). The bf16
per-layer term was checked the same way on CPU (bf16 base, fp32 LoRA): within 1%. To recalibrate after the toolkit changes, profile on
CPU in fp32 and compare stage by stage with ``EstimateSettings(dtype="fp32", device="cpu", ...)``:

* ``log`` and ``advantages`` are the persistent state: weights, adapters, heads, AdamW states, rollout.
* ``score_frozen`` / ``score_policy`` above ``log`` is the final hidden states plus ``SCORE_LOGITS_COPIES``
  x B x G x V x 4 (the layers' ``NOGRAD_PER_TOKEN`` only matter when G is short and T long).
* ``generate`` above ``log`` is the prefill: the KV cache of P tokens plus ``NOGRAD_PER_TOKEN`` over B x P.
* ``train`` above ``log`` is the largest of ``train_phases``: with SmolLM2 it is ``backward_start`` (two
  graphs of ``layer_saved_bytes``; the slope over the number of layers or the batch isolates the per-layer
  term). ``TRAIN_LOGITS_BACKWARD`` shows once logits dominate (gradient checkpointing, a large vocabulary).
* Equal-length prompts give no attention mask (``padded_prompts=False``): k and v then stay kv-sized.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..layout import (FUSED_STAGE, GENERATION_BACKENDS, MODES, OBJECTIVES, counts, fusion_chunk_rows, objective_info,
                     role_plan)
from .levers import Levers, add_lever_arguments, levers_from_args

QUANTS = ("none", "8bit", "4bit")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICES = ("cuda", "cpu")
CATEGORIES = ("weights", "adapters_heads", "gradients", "optimizer", "activations", "engine")
PRESET_DIR = Path(__file__).parents[1] / "presets"
GiB = 1 << 30
MiB = 1 << 20
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRA slots (vllm.config.lora.MaxLoRARanks)

# ---------------------------------------------------------------------------------------- layout of the modes

# Read from the role plans (layout.py), for PPO: base copies 4/2/1/1 (full/lora/j-hydra/hydra), LoRA adapters
# 0/2/1/2, forwards with grad alive at backward time 2/2/1/2. Critic-free objectives drop the critic's adapter
# (or full copy), its graph and the value head. Each head is a Linear(h, 1) with a bias: h + 1 fp32 parameters.
BASE_COPIES = {mode: counts(role_plan(mode))["base_copies"] for mode in MODES}

# ------------------------------------------------------------------------------ calibration constants (measured)

# Vocab-sized fp32 tensors (each B x G x V x 4 bytes, or m x G x V x 4 in train) alive at once:
SCORE_LOGITS_COPIES = 2  # no-grad scoring: lm_head(...).float() and its "/ temperature" copy, briefly together
TRAIN_LOGITS_SAVED = 1  # kept for backward: the temperature-scaled logits that selective_log_softmax reads
TRAIN_LOGITS_BACKWARD = 4  # backward through selective_log_softmax: saved logits + gradient buffer + per-row
#                            select/gather gradients (full-size zeros) being accumulated; measured 4.0 copies
DECODE_VOCAB_BYTES = 24  # per (B x V) element while sampling: fp32 last-position logits, temperature/top-p copies,
#                          sorted values (4) and sort indices (int64, 8)
# Elements per token alive inside one decoder layer of a no-grad forward (residual, norm output, q/k/v, MLP
# gate/up/act/product and the LoRA branch's result); measured for SmolLM2 (h=576, I=1536): 34.0 KB/token in
# fp32 = (4h + 4I) x 4 bytes, 25.5 KB/token in bf16 = (4h + 4I) x 3 bytes: half of the working set is in the
# compute dtype, half in the LoRA branch's fp32. So bytes per element = (a + 4) / 2.
NOGRAD_PER_TOKEN = (4, 4)  # (x h, x I)
# Gradient buffers in flight while back-propagating one layer (grad of the residual stream, of the MLP's
# gate/up); measured ~3.7k fp32 elements/token for SmolLM2 = h + 2I.
BACKWARD_PER_TOKEN = (1, 2)  # (x h, x I), at 4 bytes
EXPERIENCE_TOKEN_TENSORS = 7  # fp32 (B, G) rollout tensors: ref_logprobs, logprobs, values, kl, rewards,
#                               advantages, returns (plus int64 input_ids, attention_mask, response_mask)

# ---------------------------------------------------------------------------------------------- GPU table

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit AdamW states for smaller tensors
BNB_BLOCK = 256  # elements per fp32 absmax of its block-wise 8-bit states

CUDA_RESERVED_BYTES = 1 * GiB  # not tensors: CUDA context (~0.3-0.5 GiB), cuBLAS/cuDNN workspaces, fragmentation


@dataclass(frozen=True)
class GPU:
    name: str
    total_mib: int  # nvidia-smi "memory.total" of the card (what the driver exposes, not the marketing GB)

    @property
    def usable_bytes(self) -> int:
        """Memory left for tensors: the card's total minus ``CUDA_RESERVED_BYTES``."""
        return self.total_mib * MiB - CUDA_RESERVED_BYTES


GPUS = (
    GPU("T4 16GB", 15360),
    GPU("L4 24GB", 23034),
    GPU("RTX 4090 24GB", 24564),
    GPU("A100 40GB", 40960),
    GPU("L40S 48GB", 46068),
    GPU("RTX A6000 48GB", 49140),
    GPU("A100 80GB", 81920),
    GPU("H100 80GB", 81559),
)

# ------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder; everything the estimate needs from a config.json."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    @classmethod
    def from_config(cls, source, name: str | None = None) -> ModelShape:
        """From a config dict, a ``transformers.PretrainedConfig``, a config.json path or a model directory.
        A missing or malformed key is a one-line ``ValueError`` naming the file and the key."""
        config, where = _read_config(source)
        config = config.get("text_config", config) if "hidden_size" not in config else config
        for key in cls.REQUIRED:
            if key not in config:
                needed = ", ".join(cls.REQUIRED)
                raise ValueError(f"{where}: missing key {key!r} (a Llama-style decoder config needs {needed})")
        values = {key: _positive_int(config, key, where) for key in cls.REQUIRED}
        heads = values["num_attention_heads"]
        kv_heads = _positive_int(config, "num_key_value_heads", where) if config.get("num_key_value_heads") else heads
        head_dim = (_positive_int(config, "head_dim", where) if config.get("head_dim")
                    else values["hidden_size"] // heads)
        return cls(
            name=name or config.get("_name_or_path") or where, hidden_size=values["hidden_size"],
            num_layers=values["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=values["intermediate_size"], vocab_size=values["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # LlamaConfig's default
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers: what bitsandbytes quantizes and LoRA wraps."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def dense_params(self) -> int:
        """Parameters that stay in the compute dtype even on a quantized base: embeddings, lm_head, norms."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.vocab_size * self.hidden_size + head + norms

    @property
    def num_params(self) -> int:
        return self.linear_params + self.dense_params

    def lora_params(self, r: int) -> int:
        """One adapter on all seven linears: A (r x in) + B (out x r) each, no bias."""
        return self.num_layers * r * sum(i + o for i, o in self.linear_shapes())

    @property
    def largest_linear(self) -> int:
        return max(i * o for i, o in self.linear_shapes())


def _read_config(source) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "config"
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return source.to_dict(), getattr(source, "name_or_path", "") or type(source).__name__
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004 - bad input
    return config, str(path)


def _positive_int(config: dict, key: str, where: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
    return value


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ModelShape:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(presets())}, or pass --config")
    return ModelShape.from_config(path, name=name)


# ---------------------------------------------------------------------------------------------- settings


@dataclass
class EstimateSettings(Levers):
    """One PPO iteration's shape. Defaults describe a GPU run (bf16); for a CPU run use device cpu, dtype fp32."""

    mode: str = "hydra"  # full | lora | j-hydra | hydra (docs/design.md, "The four modes")
    objective: str = "ppo"  # ppo (critic) | rloo | grpo | online_dpo (critic-free: no critic adapter, value head)
    quant: str = "none"  # frozen base precision: none | 8bit | 4bit (bitsandbytes; NF4 with double quant)
    batch_size: int = 8  # sequences generated per iteration (B = prompts x samples per prompt)
    minibatch_size: int | None = None  # sequences per forward/backward in train (m); None = batch_size
    prompt_len: int = 256  # prompt tokens (P), left-padded
    gen_len: int = 256  # generated tokens (G); EOS ignored, as in the profiler
    lora_r: int = 16  # LoRA rank on q, k, v, o, gate, up, down
    gradient_checkpointing: bool = False  # keep only each layer's input; recompute one layer at a time in backward
    dtype: str = "bf16"  # compute dtype of the base: fp32 | bf16 | fp16
    device: str = "cuda"  # cuda: AdamW uses foreach kernels (one parameter-sized temporary); cpu: per tensor
    padded_prompts: bool = True  # prompts of unequal length -> an attention mask -> k, v repeated to all heads
    fusion: bool = False  # generation and scoring as one stage, retired rows scored in chunks (fusion.py)
    fusion_tail_fraction: float = 0.2  # the chunk: this share of the batch
    engine: str = "hf"  # who samples: hf (generate on the shared base) | vllm (an engine beside the learner)
    engine_sleep: bool = False  # vllm sleep mode: weights to host memory, KV cache freed outside generate
    engine_kv_cache_gib: float | None = None  # vllm's KV cache; None: what the batch needs (B x T tokens)

    def __post_init__(self):
        _check_choice("mode", self.mode, MODES)
        _check_choice("objective", self.objective, tuple(OBJECTIVES))
        _check_choice("quant", self.quant, QUANTS)
        _check_choice("dtype", self.dtype, tuple(DTYPE_BYTES))
        _check_choice("device", self.device, DEVICES)
        for key in ("batch_size", "prompt_len", "gen_len", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            raise ValueError(f"minibatch_size must be at least 1, got {self.minibatch_size}")
        if self.minibatch_size is not None and self.minibatch_size > self.batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) must not exceed batch_size ({self.batch_size}): "
                             "a minibatch is a slice of the batch")
        self.check_levers()
        if not 0 < self.fusion_tail_fraction <= 1:
            raise ValueError(f"fusion_tail_fraction must be in (0, 1], got {self.fusion_tail_fraction}")
        _check_choice("engine", self.engine, GENERATION_BACKENDS)
        if self.engine == "vllm" and (self.fusion or self.mode == "full"):
            raise ValueError("the vllm engine serves an actor adapter and schedules its own batches: use it "
                             "without --fusion, with mode lora, j-hydra or hydra")
        if self.engine_kv_cache_gib is not None and self.engine_kv_cache_gib <= 0:
            raise ValueError(f"engine_kv_cache_gib must be > 0, got {self.engine_kv_cache_gib}")
        if self.adapter_dtype == "compute" and self.dtype == "fp16":
            raise ValueError("adapter_dtype compute with an fp16 base would train fp16 weights without loss scaling; "
                             "use --adapter-dtype float32 with --dtype fp16")
        if self.mode == "full" and self.quant != "none":
            raise ValueError(f"mode 'full' trains every weight of the policy and the critic, which a {self.quant} "
                             "bitsandbytes base cannot (its weights are frozen); use --quant none, or mode "
                             "lora / j-hydra / hydra")

    @property
    def layout(self) -> dict[str, int]:
        """base_copies, adapters, full_copies, train_graphs, value_heads of this mode and objective."""
        return counts(role_plan(self.mode, objective_info(self.objective).critic))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def adapter_bytes(self) -> int:
        """Bytes per LoRA element (weights, gradients, torch AdamW states): fp32, or the compute dtype."""
        return self.dtype_bytes if self.adapter_dtype == "compute" else 4

    @property
    def offload(self) -> bool:
        """Whether saved activations leave the device (CUDA only, as in the toolkit)."""
        return self.activation_offload and self.device == "cuda"

    def logit_tokens(self, rows: int) -> int:
        """Response tokens whose vocab-sized logits exist at once: all of ``rows`` x G, or one chunk."""
        whole = rows * self.gen_len
        return min(whole, self.logprob_chunk_size) if self.logprob_chunk_size else whole

    @property
    def micro_batch(self) -> int:
        """m: the rows of one training forward (a minibatch never exceeds the batch)."""
        return min(self.minibatch_size or self.batch_size, self.batch_size)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len


def _check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {key} {value!r}: use one of {', '.join(choices)}")


# ------------------------------------------------------------------------------------------ persistent state


def base_weight_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """One copy of the base: quantized linear layers plus embeddings, lm_head and norms in the compute dtype."""
    return quantized_linear_bytes(shape, s) + shape.dense_params * s.dtype_bytes


def quantized_linear_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    n = shape.linear_params
    if s.quant == "4bit":
        # NF4: two weights per byte; double quant stores one uint8 absmax per 64-weight block and one fp32
        # absmax per 256 of those blocks, plus a fixed quant state per linear layer (the fp32 256-entry code of
        # the nested quantization and its offset: 1096 bytes measured with bitsandbytes 0.50).
        linears = 7 * shape.num_layers
        return math.ceil(n / 2 + n / 64 + 4 * n / (64 * 256)) + 1096 * linears
    if s.quant == "8bit":
        # LLM.int8: one int8 per weight plus one fp32 scale per output row (SCB).
        rows = shape.num_layers * sum(o for _, o in shape.linear_shapes())
        return n + 4 * rows
    return n * s.dtype_bytes


def trainable_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Bytes of the trainable parameters: LoRA adapters and the value head (fp32), or, in full mode, the whole
    policy and critic (in the compute dtype) plus the value head; critic-free objectives have no critic part.
    Gradients and each AdamW state match it."""
    return sum(numel * element_bytes * count for numel, element_bytes, count in trainable_tensors(shape, s))


def trainable_tensors(shape: ModelShape, s: EstimateSettings) -> list[tuple[int, int, int]]:
    """(elements, bytes per element, how many) of every trainable tensor: each adapter's A (r x in) and B (out x
    r) per linear and layer, or every weight of each full-mode copy; and the value head's weight and bias."""
    layout, h = s.layout, shape.hidden_size
    heads = [(h, 4, layout["value_heads"]), (1, 4, layout["value_heads"])]
    if s.mode == "full":
        copies, a = layout["full_copies"], s.dtype_bytes
        lm_head = 0 if shape.tie_word_embeddings else 1
        weights = [(i * o, a, copies * shape.num_layers) for i, o in shape.linear_shapes()]
        weights += [(shape.vocab_size * h, a, copies * (1 + lm_head)), (h, a, copies * (2 * shape.num_layers + 1))]
        return weights + heads
    count = layout["adapters"] * shape.num_layers
    lora = [(s.lora_r * size, s.adapter_bytes, count) for i, o in shape.linear_shapes() for size in (i, o)]
    return lora + heads


def optimizer_state_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """AdamW's exp_avg and exp_avg_sq. torch: the dtype of their parameter. bitsandbytes 8-bit: one byte per
    element plus an fp32 absmax per 256-element block, for tensors of at least 4,096 elements; smaller ones keep
    two fp32 states (its ``min_8bit_size``)."""
    if s.optim == "adamw_torch":
        return 2 * trainable_bytes(shape, s)
    total = 0
    for numel, _, count in trainable_tensors(shape, s):
        per_tensor = 2 * 4 * numel if numel < BNB_MIN_8BIT_SIZE else 2 * (numel + 4 * math.ceil(numel / BNB_BLOCK))
        total += count * per_tensor
    return total


def critic_trainable_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """The part trained through the critic's own graph (0 in j-hydra, whose one graph serves both roles, and for
    critic-free objectives)."""
    if s.layout["train_graphs"] == 1:
        return 0
    if s.mode == "full":
        return shape.num_params * s.dtype_bytes + 4 * (shape.hidden_size + 1)
    return s.adapter_bytes * shape.lora_params(s.lora_r) + 4 * (shape.hidden_size + 1)


def persistent_bytes(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """What lives in every stage (from the second iteration on): weights, adapters + heads, AdamW states."""
    layout = s.layout
    heads = 1 + layout["value_heads"]  # the reward head, and the value head where there is a critic
    adapters = s.adapter_bytes * layout["adapters"] * shape.lora_params(s.lora_r) + 4 * heads * (shape.hidden_size + 1)
    return {
        "weights": layout["base_copies"] * base_weight_bytes(shape, s),
        "adapters_heads": adapters,
        "gradients": 0,  # set to None after every optimizer step: only inside train (see train_phases)
        "optimizer": optimizer_state_bytes(shape, s),
    }


# -------------------------------------------------------------------------------------- activation terms


def kv_cache_bytes(shape: ModelShape, s: EstimateSettings, batch: int, length: int) -> int:
    """generate's DynamicCache: a key and a value tensor of (batch, kv_heads, length, head_dim) per layer."""
    return 2 * shape.num_layers * batch * length * shape.kv_dim * s.dtype_bytes


def nograd_layer_bytes(shape: ModelShape, s: EstimateSettings, tokens: int) -> int:
    """Peak inside one decoder layer of a no-grad forward; earlier layers' tensors are already freed."""
    per_token = NOGRAD_PER_TOKEN[0] * shape.hidden_size + NOGRAD_PER_TOKEN[1] * shape.intermediate_size
    return tokens * per_token * (s.dtype_bytes + s.adapter_bytes) // 2


def mask_bytes(s: EstimateSettings, batch: int, length: int) -> int:
    """The (batch, 1, length, length) bool attention mask transformers builds for a padded batch."""
    return batch * length * length if s.padded_prompts else 0


def dequant_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """A quantized linear is dequantized to the compute dtype one layer at a time (bitsandbytes' batched 4-bit
    GEMM, and the backward of both 4- and 8-bit): the largest weight briefly exists at full precision."""
    return 0 if s.quant == "none" else shape.largest_linear * s.dtype_bytes


def layer_saved_bytes(shape: ModelShape, s: EstimateSettings, tokens: int) -> int:
    """Bytes one decoder layer saves for backward, for ``tokens`` tokens (no gradient checkpointing).

    * attention: SDPA keeps q, k, v and its output (which is also o_proj's input, no copy); with a padding mask
      transformers repeats k and v to all heads first (``repeat_kv``), so they are q-sized; plus the fp32
      logsumexp per head.
    * MLP: silu keeps gate, the product keeps silu(gate) and up: 3 x I.
    * RMSNorm (x2) upcasts its input to fp32 and keeps it (pow and mul) and the fp32 rsqrt per token.
    * LoRA (frozen base linears keep nothing): lora_A keeps its input, lora_B keeps lora_A's (r-sized, fp32)
      output. With fp32 activations the inputs are tensors already counted (norm outputs xn, xn2; the product
      before down_proj: 2h + I). With bf16 activations peft casts each module's input to fp32 separately:
      q, k, v, gate, up (5 x h), o (q) and down (I) copies.
    * full mode instead keeps every linear's input for its weight gradient (xn, xn2, product, in dtype) and
      each trainable norm's normalised input (2 x h, in dtype).
    * 8-bit bases: bitsandbytes' int8 matmul keeps its (dtype) input too, which with bf16 activations is a
      tensor of its own (xn, xn2, product).
    """
    h, q, i, a = shape.hidden_size, shape.q_dim, shape.intermediate_size, s.dtype_bytes
    kv = q if s.padded_prompts else shape.kv_dim
    per_token = a * (2 * q + 2 * kv) + 4 * shape.num_heads  # q, out; k, v; logsumexp
    per_token += a * 3 * i  # gate, silu(gate), up
    per_token += 4 * 2 * (h + 1)  # norm inputs (fp32) and rsqrt
    per_token += _trainable_inputs_per_token(shape, s)
    return tokens * per_token


def _trainable_inputs_per_token(shape: ModelShape, s: EstimateSettings) -> int:
    h, q, i, a = shape.hidden_size, shape.q_dim, shape.intermediate_size, s.dtype_bytes
    if s.mode == "full":
        return a * (2 * h + i) + a * 2 * h
    ab = s.adapter_bytes  # adapters in the activations' dtype keep the tensors already there; fp32 ones, copies
    lora_inputs = ab * (2 * h + i) if a == ab else ab * (5 * h + q + i)
    int8_inputs = a * (2 * h + i) if s.quant == "8bit" and a != 4 else 0
    return lora_inputs + ab * 7 * s.lora_r + int8_inputs


def graph_bytes(shape: ModelShape, s: EstimateSettings, tokens: int) -> int:
    """One role's forward-with-grad, as kept until backward: every layer's saved tensors, or with gradient
    checkpointing only each layer's input hidden states; plus the final norm's fp32 input and the final hidden
    states (the value head keeps a view of them)."""
    h, a = shape.hidden_size, s.dtype_bytes
    if s.offload:  # everything saved for backward waits in host memory
        return 0
    per_layer = tokens * h * a if s.gradient_checkpointing else layer_saved_bytes(shape, s, tokens)
    return shape.num_layers * per_layer + tokens * h * (4 + a)


def backward_layer_bytes(shape: ModelShape, s: EstimateSettings, tokens: int) -> int:
    """Extra while back-propagating one layer: gradient buffers, plus (checkpointing) the recomputed layer."""
    grads = 4 * tokens * (BACKWARD_PER_TOKEN[0] * shape.hidden_size + BACKWARD_PER_TOKEN[1] * shape.intermediate_size)
    # with checkpointing, the layer recomputed; with offload and no checkpointing, its saved tensors brought back
    recomputed = layer_saved_bytes(shape, s, tokens) if s.gradient_checkpointing or s.offload else 0
    return grads + recomputed + dequant_bytes(shape, s)


def logits_bytes(shape: ModelShape, s: EstimateSettings, rows: int) -> int:
    """One fp32 (rows, G, V) tensor, or (chunk, V) with ``logprob_chunk_size``: the LM head runs on the response
    positions only, then ``.float()``."""
    return 4 * s.logit_tokens(rows) * shape.vocab_size


def chunk_states_bytes(shape: ModelShape, s: EstimateSettings, rows: int) -> int:
    """Chunked log-probs flatten the (rows, G, h) response states first: one copy (0 without chunks)."""
    return rows * s.gen_len * shape.hidden_size * s.dtype_bytes if s.logprob_chunk_size else 0


def experience_bytes(s: EstimateSettings) -> int:
    """The rollout: int64 input_ids and attention_mask (B, T) and response_mask (B, G), fp32 (B, G) tensors."""
    b, t, g = s.batch_size, s.seq_len, s.gen_len
    return 8 * (2 * b * t + b * g) + 4 * EXPERIENCE_TOKEN_TENSORS * b * g


# ------------------------------------------------------------------------------------------------ stages


def generate_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Sampling G tokens with a KV cache. Peak is either the prefill (cache of P, one layer's no-grad working
    set over B x P tokens) or the last decode step (cache of T plus one layer's cache being re-concatenated);
    the LM head only ever runs on the last position (B x V)."""
    b, p, t = s.batch_size, s.prompt_len, s.seq_len
    vocab = DECODE_VOCAB_BYTES * b * shape.vocab_size
    prefill = kv_cache_bytes(shape, s, b, p) + nograd_layer_bytes(shape, s, b * p) + mask_bytes(s, b, p)
    one_layer = kv_cache_bytes(shape, s, b, t) // shape.num_layers
    decode = kv_cache_bytes(shape, s, b, t) + one_layer + mask_bytes(s, b, t)
    return max(prefill, decode) + vocab + dequant_bytes(shape, s)


def scoring_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """One no-grad forward over B x T (score_frozen and score_policy alike: where a stage needs two forwards,
    reference then reward model, or actor then critic, they run one after the other, so the peak is one
    forward's). Peak: inside a layer (plus the previous forward's final hidden states, still referenced), or
    at the LM head: final hidden states + the response logits and their temperature-scaled copy."""
    b, t, h, a = s.batch_size, s.seq_len, shape.hidden_size, s.dtype_bytes
    hidden = b * t * h * a
    layers = nograd_layer_bytes(shape, s, b * t) + mask_bytes(s, b, t) + dequant_bytes(shape, s) + hidden
    head = hidden + SCORE_LOGITS_COPIES * logits_bytes(shape, s, b) + chunk_states_bytes(shape, s, b)
    return max(layers, head)


def fused_experience_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Generation and scoring fused (``fusion``): the largest of decoding; a chunk of ``fusion_tail_fraction`` x B
    retired rows scored while the KV cache of the rows still decoding (at most the batch's, at full length) is
    alive; and the whole batch scored at once, the cache freed, when every row ends in the same step (all cut at
    the length cap, as in the profiler)."""
    chunk = replace(s, batch_size=fusion_chunk_rows(s.fusion_tail_fraction, s.batch_size))
    return max(generate_bytes(shape, s), scoring_bytes(shape, s),
               kv_cache_bytes(shape, s, s.batch_size, s.seq_len) + scoring_bytes(shape, chunk))


def train_phases(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """Bytes above the persistent state in the three candidate peaks of one training minibatch.

    * backward_start: every role's graph (actor + critic, or the one j-hydra graph), the saved logits, and the
      first layer being back-propagated (autograd runs the critic, created last, first).
    * logits_backward: the actor's graph, the vocab-sized gradients of selective_log_softmax, and the critic's
      gradients, already accumulated. (Creating the logits in the forward, 2 copies + entropy chunks, is
      always below this.)
    * optimizer_step: all gradients, plus AdamW's foreach temporary the size of the trainable set on CUDA, or
      of the largest trainable tensor on CPU (a loop over parameters).
    """
    m = s.micro_batch
    tokens = m * s.seq_len
    graph, logits = graph_bytes(shape, s, tokens), logits_bytes(shape, s, m)
    backward = backward_layer_bytes(shape, s, tokens)
    # chunked: each chunk saves only its (flattened) states and recomputes its logits in backward
    saved_logits = chunk_states_bytes(shape, s, m) if s.logprob_chunk_size else TRAIN_LOGITS_SAVED * logits
    return {
        "backward_start": s.layout["train_graphs"] * graph + saved_logits + backward,
        "logits_backward": graph + TRAIN_LOGITS_BACKWARD * logits + critic_trainable_bytes(shape, s),
        "optimizer_step": trainable_bytes(shape, s) + optimizer_step_temporary(shape, s),
    }


def phase_gradients(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """The gradient bytes inside each of ``train_phases`` (filed under "gradients" in the breakdown)."""
    return {"backward_start": 0, "logits_backward": critic_trainable_bytes(shape, s),
            "optimizer_step": trainable_bytes(shape, s)}


def optimizer_step_temporary(shape: ModelShape, s: EstimateSettings) -> int:
    """AdamW's temporaries. CUDA (foreach): ``_foreach_sqrt(exp_avg_sqs)`` over every trainable tensor at once,
    then divided in place. CPU (a loop): ``exp_avg_sq.sqrt() / bias_correction`` for one tensor at a time, two
    copies of it, so the largest tensor counts: the embedding in full mode, else the largest LoRA matrix."""
    if s.optim == "adamw_bnb_8bit":  # updates each tensor in place, in one kernel
        return 0
    if s.device == "cuda":
        return trainable_bytes(shape, s)
    if s.mode == "full":
        return 2 * shape.vocab_size * shape.hidden_size * s.dtype_bytes
    return 2 * s.adapter_bytes * s.lora_r * max(max(i, o) for i, o in shape.linear_shapes())


def stage_activations(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """Bytes above the persistent state at each stage's peak (the rollout included from generate on). With the
    vllm engine the learner does not decode: its generate stage holds the rollout only (the engine's memory is
    its own category, ``engine_bytes``)."""
    rollout = experience_bytes(s)
    small = 8 * 4 * s.batch_size * s.gen_len  # a few (B, G) fp32 temporaries: GAE, whitening, metrics
    decoding = generate_bytes(shape, s) if s.engine == "hf" else 0
    if s.fusion:
        experience = {FUSED_STAGE: fused_experience_bytes(shape, s) + rollout}
    else:
        experience = {"generate": decoding + rollout, "score_frozen": scoring_bytes(shape, s) + rollout,
                      "score_policy": scoring_bytes(shape, s) + rollout}
    return {
        **experience,
        "advantages": rollout + small,
        "train": max(train_phases(shape, s).values()) + rollout,
        "log": rollout + small,
    }


def engine_weight_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """The vllm engine's own copy of the base (quantized as the learner's is) and its one LoRA slot, at vLLM's
    smallest rank slot that holds lora_r, in the compute dtype."""
    slot = next(r for r in (*VLLM_LORA_RANKS, s.lora_r) if r >= s.lora_r)
    return base_weight_bytes(shape, s) + shape.lora_params(slot) * s.dtype_bytes


def engine_kv_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """The engine's KV cache: ``engine_kv_cache_gib``, or what one batch of B x T tokens needs."""
    if s.engine_kv_cache_gib is not None:
        return int(s.engine_kv_cache_gib * GiB)
    return kv_cache_bytes(shape, s, s.batch_size, s.seq_len)


def engine_bytes(shape: ModelShape, s: EstimateSettings, stage: str) -> int:
    """What the vllm engine holds on the device in ``stage``: its weights and KV cache, or, in sleep mode,
    nothing outside generate (weights in host memory, KV cache freed); 0 with hf."""
    if s.engine != "vllm" or (s.engine_sleep and stage != "generate"):
        return 0
    return engine_weight_bytes(shape, s) + engine_kv_bytes(shape, s)


# ------------------------------------------------------------------------------------------------ estimate


@dataclass
class Estimate:
    """Per-stage peaks and, per stage, the bytes by category; ``peak_bytes`` is the largest stage peak."""

    shape: ModelShape
    settings: EstimateSettings
    stage_breakdown: dict[str, dict[str, int]]  # stage -> category -> bytes at that stage's peak
    train_phases: dict[str, int]
    host_bytes: int = 0  # host memory holding offloaded activations (CUDA) and a sleeping vllm engine's weights

    @property
    def stages(self) -> dict[str, int]:
        return {name: sum(parts.values()) for name, parts in self.stage_breakdown.items()}

    @property
    def peak_stage(self) -> str:
        stages = self.stages
        return max(stages, key=stages.get)

    @property
    def peak_bytes(self) -> int:
        return self.stages[self.peak_stage]

    @property
    def breakdown(self) -> dict[str, int]:
        """The categories at the peak stage."""
        return self.stage_breakdown[self.peak_stage]

    @property
    def dominant_category(self) -> str:
        return max(self.breakdown, key=self.breakdown.get)

    def to_dict(self) -> dict:
        return {
            "model": asdict(self.shape) | {"num_params": self.shape.num_params},
            "settings": asdict(self.settings) | {"micro_batch": self.settings.micro_batch},
            "peak_bytes": self.peak_bytes,
            "peak_stage": self.peak_stage,
            "stages": {name: {"peak_bytes": peak, "breakdown": self.stage_breakdown[name]}
                       for name, peak in self.stages.items()},
            "breakdown": self.breakdown,
            "train_phases": self.train_phases,
            "host_bytes": self.host_bytes,
        }


def estimate(shape: ModelShape, settings: EstimateSettings) -> Estimate:
    """The per-stage peak memory of one (steady-state) PPO iteration."""
    persistent = persistent_bytes(shape, settings)
    phases = train_phases(shape, settings)
    breakdown = {}
    for stage, activations in stage_activations(shape, settings).items():
        parts = dict(persistent, activations=activations, engine=engine_bytes(shape, settings, stage))
        if stage == "train":  # file the gradients of the dominant phase under their own category
            grads = phase_gradients(shape, settings)[max(phases, key=phases.get)]
            parts.update(gradients=grads, activations=activations - grads)
        breakdown[stage] = parts
    asleep = engine_weight_bytes(shape, settings) if settings.engine == "vllm" and settings.engine_sleep else 0
    return Estimate(shape, settings, breakdown, phases, offloaded_bytes(shape, settings) + asleep)


def offloaded_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """What activation offload keeps in pinned host memory at the start of backward: every training graph."""
    if not s.offload:
        return 0
    return s.layout["train_graphs"] * graph_bytes(shape, replace(s, activation_offload=False), s.micro_batch * s.seq_len)


def largest_batch(shape: ModelShape, settings: EstimateSettings, budget_bytes: int, limit: int = 1 << 16) -> int:
    """The largest batch_size whose peak fits ``budget_bytes`` (0 if not even 1 does). The peak never falls as
    the batch grows, so double then bisect. A fixed ``minibatch_size`` stays fixed (capped by the batch)."""
    def fits(batch: int) -> bool:
        return estimate(shape, replace(settings, batch_size=batch)).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, 2 * high
    if high > limit:
        return low
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def gpu_table(shape: ModelShape, settings: EstimateSettings, gpus=GPUS) -> list[dict]:
    """For each card: does this setting fit, with how much headroom, and the largest batch that would."""
    peak = estimate(shape, settings).peak_bytes
    return [{"name": gpu.name, "usable_bytes": gpu.usable_bytes, "fits": peak <= gpu.usable_bytes,
             "headroom_bytes": gpu.usable_bytes - peak,
             "largest_batch": largest_batch(shape, settings, gpu.usable_bytes)}
            for gpu in gpus]


# ------------------------------------------------------------------------------------------------------ CLI


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``hydra-rlhf estimate``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"A bundled model shape: {', '.join(presets())} (default llama-3.1-8b).")
    source.add_argument("--config", help="A config.json, a model directory, or a hub id (needs the network).")
    parser.add_argument("--mode", default="hydra", choices=[*MODES, "all"], help="Model layout, or all four.")
    parser.add_argument("--objective", default="ppo", choices=[*OBJECTIVES, "all"],
                        help="What is trained: ppo builds a critic, rloo/grpo/online_dpo do not; all: one column each.")
    parser.add_argument("--quant", default="none", choices=QUANTS, help="Frozen base precision (bitsandbytes).")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences generated per iteration (prompts x "
                        "samples per prompt).")
    parser.add_argument("--minibatch-size", type=int, default=None, help="Sequences per training forward "
                        "(default: the batch size).")
    parser.add_argument("--prompt-len", type=int, default=256, help="Prompt tokens.")
    parser.add_argument("--gen-len", type=int, default=256, help="Generated tokens.")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="Recompute activations in backward.")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES), help="Compute dtype of the base.")
    parser.add_argument("--device", default="cuda", choices=DEVICES, help="Where it would run (cpu: use fp32).")
    parser.add_argument("--json", type=Path, help="Write the estimate here.")
    parser.add_argument("--fusion", action=argparse.BooleanOptionalAction, default=False,
                        help="Sample-level fusion: generation and scoring as one stage (generate+score).")
    parser.add_argument("--generation-backend", default="hf", choices=GENERATION_BACKENDS,
                        help="Who samples: hf, or a vllm engine beside the learner (its own base copy and KV cache).")
    parser.add_argument("--vllm-sleep-mode", action=argparse.BooleanOptionalAction, default=False,
                        help="vllm: the engine's weights go to host memory and its KV cache is freed outside generate.")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=None,
                        help="vllm: the engine's KV cache (default: what one batch needs).")
    add_lever_arguments(parser)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the per-stage, breakdown and GPU tables; write ``--json``. Bad input: one line, exit status 2."""
    import sys

    try:
        if args.mode == "all" and args.objective == "all":
            raise ValueError("--mode all and --objective all together: compare one of them at a time")
        shape = shape_from_args(args)
        modes = list(MODES) if args.mode == "all" else [args.mode]
        objectives = list(OBJECTIVES) if args.objective == "all" else [args.objective]
        skipped = [m for m in modes if m == "full" and args.quant != "none" and args.mode == "all"]
        estimates = {  # one column per mode, or per objective
            (objective if args.objective == "all" else mode): estimate(shape, settings_from_args(args, mode, objective))
            for mode in modes if mode not in skipped for objective in objectives
        }
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    gpus = {label: gpu_table(shape, est.settings) for label, est in estimates.items()}
    _print_report(shape, estimates, gpus, skipped)
    if args.json:
        group = "objectives" if args.objective == "all" else "modes" if args.mode == "all" else None
        _write_json(args.json, shape, estimates, gpus, group)
    return 0


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    if args.config is None:
        return load_preset(args.preset or "llama-3.1-8b")
    path = Path(args.config).expanduser()
    if path.exists() or args.config.endswith(".json") or "/" not in args.config.strip("/"):
        return ModelShape.from_config(path, name=path.parent.name if path.name == "config.json" else path.stem)
    return shape_from_hub(args.config)


def shape_from_hub(repo_id: str) -> ModelShape:
    """A hub id's config through transformers (network needed); offline or unknown ids are one-line errors."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(repo_id)
    except Exception as error:  # noqa: BLE001 - offline, gated, typo: all end the same way for the user
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"could not fetch the config of {repo_id!r} from the Hugging Face hub "
                         f"({type(error).__name__}: {first}); offline, use --preset or --config path/config.json"
                         ) from None
    return ModelShape.from_config(config, name=repo_id)


def settings_from_args(args: argparse.Namespace, mode: str, objective: str = "ppo") -> EstimateSettings:
    return EstimateSettings(
        mode=mode, objective=objective, quant=args.quant, batch_size=args.batch_size, minibatch_size=args.minibatch_size,
        prompt_len=args.prompt_len, gen_len=args.gen_len, lora_r=args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=args.device,
        fusion=args.fusion, engine=args.generation_backend, engine_sleep=args.vllm_sleep_mode,
        engine_kv_cache_gib=args.vllm_kv_cache_gib, **levers_from_args(args),
    )


def _write_json(path: Path, shape: ModelShape, estimates: dict, gpus: dict, group: str | None) -> None:
    """A single estimate: its keys at the top level. ``--mode all`` / ``--objective all``: one entry per column
    under "modes" / "objectives"."""
    entries = {label: est.to_dict() | {"gpus": gpus[label]} for label, est in estimates.items()}
    data = next(iter(entries.values())) if group is None else {"model": asdict(shape), group: entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- printing


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _print_report(shape: ModelShape, estimates: dict, gpus: dict, skipped: list) -> None:
    from rich.console import Console

    console = Console(width=120)
    first = next(iter(estimates.values())).settings
    console.print(f"[bold]{shape.name}[/bold]: {shape.num_params / 1e9:.2f}B parameters, {shape.num_layers} layers, "
                  f"hidden {shape.hidden_size}, vocab {shape.vocab_size}. "
                  f"{_describe(first, objective=len({e.settings.objective for e in estimates.values()}) == 1)}")
    for mode in skipped:
        console.print(f"[yellow]{mode}: skipped, it trains every weight and cannot use a {first.quant} base.[/yellow]")
    console.print(_stage_table(estimates))
    console.print(_breakdown_table(estimates))
    console.print(_gpu_table(estimates, gpus))
    for mode, est in estimates.items():
        console.print(_verdict(mode, est, gpus[mode]))


def _describe(s: EstimateSettings, objective: bool = True) -> str:
    checkpointing = "on" if s.gradient_checkpointing else "off"
    return (f"{f'Objective {s.objective}, b' if objective else 'B'}atch {s.batch_size} (minibatch {s.micro_batch}), "
            f"prompt {s.prompt_len} + gen {s.gen_len} tokens, "
            f"{s.dtype}, quant {s.quant}, LoRA r={s.lora_r}, gradient checkpointing {checkpointing}, {s.device}. "
            f"Levers: {_describe_levers(s)}.")


def _describe_levers(s: EstimateSettings) -> str:
    on = [f"log-prob chunks of {s.logprob_chunk_size}" if s.logprob_chunk_size else "",
          "8-bit AdamW" if s.optim == "adamw_bnb_8bit" else "",
          ("activation offload" + ("" if s.offload else " (no effect on cpu)")) if s.activation_offload else "",
          f"{s.dtype} adapters" if s.adapter_dtype == "compute" else "",
          f"vllm engine{' in sleep mode' if s.engine_sleep else ''}" if s.engine == "vllm" else ""]
    return ", ".join(filter(None, on)) or "none"


def _stage_table(estimates: dict):
    from rich.table import Table

    table = Table(title="Peak memory per stage (live tensors)")
    table.add_column("stage")
    for mode in estimates:
        table.add_column(mode, justify="right")
    stages = list(dict.fromkeys(stage for est in estimates.values() for stage in est.stages))
    for stage in stages:
        cells = []
        for est in estimates.values():
            if stage not in est.stages:
                cells.append("-")
                continue
            text = gib(est.stages[stage])
            cells.append(f"[bold]{text} <- peak[/bold]" if stage == est.peak_stage else text)
        table.add_row(stage, *cells)
    return table


def _breakdown_table(estimates: dict):
    from rich.table import Table

    table = Table(title="At the peak stage, by category")
    table.add_column("category")
    for mode, est in estimates.items():
        table.add_column(f"{mode} ({est.peak_stage})", justify="right")
    for category in CATEGORIES:
        if category == "engine" and not any(est.breakdown[category] for est in estimates.values()):
            continue  # no engine beside the learner: no row for it
        table.add_row(category.replace("_", " + ") if category == "adapters_heads" else category,
                      *[gib(est.breakdown[category]) for est in estimates.values()])
    table.add_row("[bold]total[/bold]", *[f"[bold]{gib(est.peak_bytes)}[/bold]" for est in estimates.values()])
    return table


def _gpu_table(estimates: dict, gpus: dict):
    from rich.table import Table

    table = Table(title=f"GPU fit (usable = nvidia-smi total - {CUDA_RESERVED_BYTES / GiB:.0f} GiB reserve)")
    table.add_column("GPU")
    table.add_column("usable", justify="right")
    for mode in estimates:
        table.add_column(f"{mode}\nfits / largest batch", justify="right")
    for row, gpu in enumerate(GPUS):
        cells = [f"{'yes' if gpus[m][row]['fits'] else 'no'} / {gpus[m][row]['largest_batch']}" for m in estimates]
        table.add_row(gpu.name, gib(gpu.usable_bytes), *cells)
    return table


def _verdict(mode: str, est: Estimate, rows: list[dict]) -> str:
    """One line: the peak, where it comes from, and, if no card holds it, by how much the largest misses."""
    share = est.breakdown[est.dominant_category] / est.peak_bytes
    line = (f"{mode}: peak {gib(est.peak_bytes)} in '{est.peak_stage}', dominated by {est.dominant_category} "
            f"({share:.0%}).")
    if est.host_bytes:
        line += f" Activation offload holds {gib(est.host_bytes)} of pinned host memory (check the machine's RAM)."
    if not any(row["fits"] for row in rows):
        biggest = max(rows, key=lambda row: row["usable_bytes"])
        line += (f" [red]Fits none of the listed GPUs: {gib(-biggest['headroom_bytes'])} over the largest "
                 f"({biggest['name']}, {gib(biggest['usable_bytes'])} usable).[/red]")
    return line
