"""Predict the per-stage peak memory of one RL iteration from a model's shape alone: no weights, no torch.

**What is counted** is what ``hydra-rlhf profile`` measures: live tensor bytes (CUDA ``max_memory_allocated``,
or live tensor storages on CPU), per stage, including everything that persists across stages (weights,
adapters, optimizer state, the rollout). The CUDA context, cuBLAS workspaces and allocator fragmentation are
not modelled; the GPU table subtracts a fixed reserve for them from each card instead (``CUDA_RESERVED_BYTES``).
PyTorch allocates cuBLAS's and cuBLASLt's workspaces through its caching allocator, so ``max_memory_allocated``
counts them: on an H200 every stage measured about 64 MiB above this estimate, in every mode (docs/gpu.md).

**What is modelled** is this toolkit's code path, read from model/hydra.py, experience/ and trainer.py:

* ``HydraModel._hidden`` runs the decoder with ``use_cache=False``; the LM head is applied to the response
  positions only, upcast with ``.float()`` and divided by the temperature (a new fp32 tensor even at 1.0), then
  trl's ``selective_log_softmax`` (row-wise logsumexp: the scaled logits are the only vocab-sized tensor it
  keeps for backward) and ``entropy_from_logits`` (no grad, 128-row chunks).
* ``policy_scores`` runs the actor forward, then the critic forward (one shared forward in j-hydra); the trainer
  sums both losses and calls ``backward`` once, so both graphs are alive together at the start of backward.
* AdamW states are created at the first step and live from then on (so in every stage of iteration 2+, which
  is the iteration the profiler's per-stage maximum reports); gradients are set to ``None`` after every step,
  so they exist only inside ``train``.

Notation in every comment: B sequences per iteration (``s.sequences``: prompts x samples per prompt), m rows of
one training forward (``s.micro_batch``), P ``max_prompt_length``, G ``max_new_tokens``, T = P + G, N tokens in
one forward (B*T or m*T), L layers, h hidden, q = heads*head_dim, kv = kv_heads*head_dim, I intermediate,
V vocab, r LoRA rank, a bytes per element of the compute dtype, and 4 = fp32 (adapters, heads, logits).

**Calibration.** The activation terms are structural (which tensors autograd saves, read from the code of
transformers' Llama, peft's LoRA layer, bitsandbytes and trl), plus the few measured constants in CAPITALS
below. Checked against the toolkit's own profiler (``profile_mode``, CPU, fp32, live tensor storages) on the
bundled SmolLM2-135M (hydra at 8 sequences, 64 + 32 tokens; full, lora and hydra with gradient checkpointing at
4 sequences, 32 + 32 tokens): every stage within 3%; tests/test_estimate.py profiles and compares live.
``benchmarks/estimate_accuracy.py`` repeats the check on demand (with mixed-length prompts left-padded to
``max_prompt_length``, hydra at 1 and 4 sequences, lora, j-hydra: worst stage 0.7%). The bf16 per-layer term was
checked the same way on CPU (bf16 base, fp32 LoRA): within 1%. To recalibrate after the toolkit changes, profile
on CPU in fp32 and compare stage by stage with ``EstimateSettings(dtype="float32", device="cpu", ...)``:

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

import math
from dataclasses import asdict, dataclass, replace

from ..layout import FUSED_STAGE, MODES, counts, fusion_chunk_rows, role_plan
from .shape import GiB, EstimateSettings, ModelShape

CATEGORIES = ("weights", "adapters_heads", "gradients", "optimizer", "activations", "engine")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRA slots (vllm.config.lora.MaxLoRARanks)

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
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit AdamW states for smaller tensors
BNB_BLOCK = 256  # elements per fp32 absmax of its block-wise 8-bit states

# ------------------------------------------------------------------------------------------ persistent state


def base_weight_bytes(shape: ModelShape, s: EstimateSettings, quantization: str | None = None) -> int:
    """One copy of the base: quantized linear layers plus embeddings, lm_head and norms in the compute dtype."""
    return quantized_linear_bytes(shape, s, quantization) + shape.dense_params * s.dtype_bytes


def quantized_linear_bytes(shape: ModelShape, s: EstimateSettings, quantization: str | None = None) -> int:
    """The decoder's linear layers in ``quantization`` (default: the run's)."""
    n, quantization = shape.linear_params, quantization or s.quantization
    if quantization == "4bit":
        # NF4: two weights per byte; double quant stores one uint8 absmax per 64-weight block and one fp32
        # absmax per 256 of those blocks, plus a fixed quant state per linear layer (the fp32 256-entry code of
        # the nested quantization and its offset: 1096 bytes measured with bitsandbytes 0.50).
        linears = 7 * shape.num_layers
        return math.ceil(n / 2 + n / 64 + 4 * n / (64 * 256)) + 1096 * linears
    if quantization == "8bit":
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
    count = layout["adapters"] * shape.adapted_layers(s.lora_layers)
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
    return s.adapter_bytes * shape.lora_params(s.lora_r, s.lora_layers) + 4 * (shape.hidden_size + 1)


def persistent_bytes(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """What lives in every stage (from the second iteration on): weights, adapters + heads, AdamW states."""
    layout = s.layout
    heads = 1 + layout["value_heads"]  # the reward head, and the value head where there is a critic
    adapters = (s.adapter_bytes * layout["adapters"] * shape.lora_params(s.lora_r, s.lora_layers)
                + 4 * heads * (shape.hidden_size + 1))
    return {
        "weights": layout["base_copies"] * base_weight_bytes(shape, s) + reward_model_bytes(shape, s),
        "adapters_heads": adapters,
        "gradients": 0,  # set to None after every optimizer step: only inside train (see train_phases)
        "optimizer": optimizer_state_bytes(shape, s),
    }


def reward_model_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """An external reward model (``reward_model_name_or_path``), counted as a frozen base of the same shape in
    ``reward_model_quantization`` whose LM head is a one-label score head. Its no-grad forward in score_frozen
    runs after the reference's and keeps no vocabulary-sized logits, so it adds no activation peak of its own."""
    if not s.reward_model_name_or_path:
        return 0
    lm_head = 0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size * s.dtype_bytes
    return base_weight_bytes(shape, s, s.reward_model_quantization) - lm_head


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
    return 0 if s.quantization == "none" else shape.largest_linear * s.dtype_bytes


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
    int8_inputs = a * (2 * h + i) if s.quantization == "8bit" and a != 4 else 0
    return lora_inputs + ab * 7 * s.lora_r + int8_inputs


def graph_bytes(shape: ModelShape, s: EstimateSettings, tokens: int) -> int:
    """One role's forward-with-grad, as kept until backward: every trained layer's saved tensors, or with gradient
    checkpointing only each one's input hidden states; plus the final norm's fp32 input and the final hidden
    states (the value head keeps a view of them). With LoRA on the top ``lora_layers`` only, the layers below
    see no tensor that needs a gradient and save nothing."""
    h, a = shape.hidden_size, s.dtype_bytes
    if s.offload:  # everything saved for backward waits in host memory
        return 0
    per_layer = tokens * h * a if s.gradient_checkpointing else layer_saved_bytes(shape, s, tokens)
    layers = shape.num_layers if s.mode == "full" else shape.adapted_layers(s.lora_layers)
    return layers * per_layer + tokens * h * (4 + a)


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
    return rows * s.max_new_tokens * shape.hidden_size * s.dtype_bytes if s.logprob_chunk_size else 0


def experience_bytes(s: EstimateSettings) -> int:
    """The rollout: int64 input_ids and attention_mask (B, T) and response_mask (B, G), fp32 (B, G) tensors."""
    b, t, g = s.sequences, s.seq_len, s.max_new_tokens
    return 8 * (2 * b * t + b * g) + 4 * EXPERIENCE_TOKEN_TENSORS * b * g


# ------------------------------------------------------------------------------------------------ stages


def generate_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Sampling G tokens with a KV cache. Peak is either the prefill (cache of P, one layer's no-grad working
    set over B x P tokens) or the last decode step (cache of T plus one layer's cache being re-concatenated);
    the LM head only ever runs on the last position (B x V)."""
    b, p, t = s.sequences, s.max_prompt_length, s.seq_len
    vocab = DECODE_VOCAB_BYTES * b * shape.vocab_size
    prefill = kv_cache_bytes(shape, s, b, p) + nograd_layer_bytes(shape, s, b * p) + mask_bytes(s, b, p)
    one_layer = kv_cache_bytes(shape, s, b, t) // shape.num_layers
    decode = kv_cache_bytes(shape, s, b, t) + one_layer + mask_bytes(s, b, t)
    return max(prefill, decode) + vocab + dequant_bytes(shape, s)


def scoring_bytes(shape: ModelShape, s: EstimateSettings, rows: int) -> int:
    """One no-grad forward over ``rows`` x T (score_frozen and score_policy alike: where a stage needs two
    forwards, reference then reward model, or actor then critic, they run one after the other, so the peak is one
    forward's). Peak: inside a layer (plus the previous forward's final hidden states, still referenced), or
    at the LM head: final hidden states + the response logits and their temperature-scaled copy."""
    t, h, a = s.seq_len, shape.hidden_size, s.dtype_bytes
    hidden = rows * t * h * a
    layers = nograd_layer_bytes(shape, s, rows * t) + mask_bytes(s, rows, t) + dequant_bytes(shape, s) + hidden
    head = hidden + SCORE_LOGITS_COPIES * logits_bytes(shape, s, rows) + chunk_states_bytes(shape, s, rows)
    return max(layers, head)


def fused_experience_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """Generation and scoring fused (``fusion``): the largest of decoding; a chunk of ``fusion_tail_fraction`` x B
    retired rows scored while the KV cache of the rows still decoding (at most the batch's, at full length) is
    alive; and the whole batch scored at once, the cache freed, when every row ends in the same step (all cut at
    the length cap, as in the profiler)."""
    b = s.sequences
    chunk = fusion_chunk_rows(s.fusion_tail_fraction, b)
    return max(generate_bytes(shape, s), scoring_bytes(shape, s, b),
               kv_cache_bytes(shape, s, b, s.seq_len) + scoring_bytes(shape, s, chunk))


def train_phases(shape: ModelShape, s: EstimateSettings) -> dict[str, int]:
    """Bytes above the persistent state in the three candidate peaks of one training micro-batch.

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
    small = 8 * 4 * s.sequences * s.max_new_tokens  # a few (B, G) fp32 temporaries: GAE, whitening, metrics
    decoding = generate_bytes(shape, s) if s.generation_backend == "hf" else 0
    scoring = scoring_bytes(shape, s, s.sequences)
    if s.fusion:
        experience = {FUSED_STAGE: fused_experience_bytes(shape, s) + rollout}
    else:
        experience = {"generate": decoding + rollout, "score_frozen": scoring + rollout,
                      "score_policy": scoring + rollout}
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
    return base_weight_bytes(shape, s) + shape.lora_params(slot, s.lora_layers) * s.dtype_bytes


def engine_kv_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """The engine's KV cache: ``vllm_kv_cache_gib``, or what one batch of B x T tokens needs."""
    if s.vllm_kv_cache_gib is not None:
        return int(s.vllm_kv_cache_gib * GiB)
    return kv_cache_bytes(shape, s, s.sequences, s.seq_len)


def engine_bytes(shape: ModelShape, s: EstimateSettings, stage: str) -> int:
    """What the vllm engine holds on the device in ``stage``: its weights and KV cache, or, in sleep mode,
    nothing outside generate (weights in host memory, KV cache freed); 0 with hf."""
    if s.generation_backend != "vllm" or (s.vllm_sleep_mode and stage != "generate"):
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
        s = self.settings
        return {
            "model": asdict(self.shape) | {"num_params": self.shape.num_params},
            "settings": asdict(s) | {"sequences": s.sequences, "micro_batch": s.micro_batch,
                                     "compute_dtype": s.compute_dtype},
            "peak_bytes": self.peak_bytes,
            "peak_stage": self.peak_stage,
            "stages": {name: {"peak_bytes": peak, "breakdown": self.stage_breakdown[name]}
                       for name, peak in self.stages.items()},
            "breakdown": self.breakdown,
            "train_phases": self.train_phases,
            "host_bytes": self.host_bytes,
        }


def sharded_bytes(shape: ModelShape, s: EstimateSettings, parts: dict[str, int], stage: str) -> dict[str, int]:
    """One rank's share of ``parts`` (``stage``'s) under ``sharding fsdp2`` over N = ``s.shards`` ranks
    (model/sharding.py): weights, adapters, the value head, gradients and AdamW states are split N ways (the frozen
    reward head stays whole, and so does a 4-bit base's quantization state, which each layer holds beside its
    shard). On top, what FSDP gathers whole, per base copy: the root unit (embeddings, LM head, final norm), whose
    whole copy stays beside its shard from the first forward after a backward to the end of the next backward
    (every stage but ``log``), and two decoder layers (the one computing and the next, prefetched), in ``train``
    each beside its all-gather buffer (measured on CPU: the no-grad stages hold two layers' worth, not four); in
    the stage whose forward gathers the root again (``generate``), its all-gather buffer too. Activations do not
    change: ``batch_size`` counts prompts per process. Not counted: a checkpoint's gather of the trained weights."""
    n = s.shards
    if n == 1:
        return parts
    root = shape.dense_params * s.dtype_bytes
    layer = (base_weight_bytes(shape, s) - root) // shape.num_layers  # one layer's linears and norms
    gathered = 0 if stage == "log" else root + (4 if stage == "train" else 2) * layer  # whole, beside the shards
    gathered += root if stage in ("generate", FUSED_STAGE) else 0
    reward_head = 4 * (shape.hidden_size + 1)
    split = {key: parts[key] // n for key in ("weights", "gradients", "optimizer")}
    if s.quantization == "4bit":  # the packed weights are split; their absmax and codes stay whole on every rank
        whole = (quantized_linear_bytes(shape, s) - math.ceil(shape.linear_params / 2)) * s.layout["base_copies"]
        split["weights"] += whole - whole // n
    return {**parts, **split, "weights": split["weights"] + gathered * s.layout["base_copies"],
            "adapters_heads": (parts["adapters_heads"] - reward_head) // n + reward_head}


def estimate(shape: ModelShape, settings: EstimateSettings) -> Estimate:
    """The per-stage peak memory of one (steady-state) iteration, on each rank."""
    persistent = persistent_bytes(shape, settings)
    phases = train_phases(shape, settings)
    breakdown = {}
    for stage, activations in stage_activations(shape, settings).items():
        parts = dict(persistent, activations=activations, engine=engine_bytes(shape, settings, stage))
        if stage == "train":  # file the gradients of the dominant phase under their own category
            grads = phase_gradients(shape, settings)[max(phases, key=phases.get)]
            parts.update(gradients=grads, activations=activations - grads)
        breakdown[stage] = sharded_bytes(shape, settings, parts, stage)
    sleeping = settings.generation_backend == "vllm" and settings.vllm_sleep_mode
    asleep = engine_weight_bytes(shape, settings) if sleeping else 0
    return Estimate(shape, settings, breakdown, phases, offloaded_bytes(shape, settings) + asleep)


def offloaded_bytes(shape: ModelShape, s: EstimateSettings) -> int:
    """What activation offload keeps in pinned host memory at the start of backward: every training graph."""
    if not s.offload:
        return 0
    return s.layout["train_graphs"] * graph_bytes(shape, replace(s, activation_offload=False), s.micro_batch * s.seq_len)
