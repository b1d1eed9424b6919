"""Hydra-SFT: one checkpoint that is both the SFT policy (LM head) and the reward model (reward head).

Objectives (one flag):
* ``hydra``  - LM loss on the chosen responses + ``reward_weight`` x Bradley-Terry loss on (chosen, rejected)
               through a scalar reward head (read at the EOS, or averaged or summed over the response:
               ``reward_pooling``); one forward serves both.
* ``sft``    - the LM loss alone (the SFT model of the ``lora``/``full`` baselines).
* ``reward`` - the Bradley-Terry loss alone (their separate reward model).

The saved checkpoint is an ordinary transformers model directory plus ``hydra/heads.safetensors``; PPO loads it
as its frozen base. LoRA is merged into the weights. A quantized (4-/8-bit) base cannot take an exact merge,
so we reload the base unquantized, merge the trained LoRA into it and save that; PPO quantizes it again at
load time with ``quantization: 4bit``. Sequences have the layout PPO scores: chat-templated prompt, response
tokens, EOS, and the reward is read as PPO reads it (the pooling is saved with the head).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, renamed
from .errors import check_at_least_one, check_positive
from .model.head_fits import CriticStart, fit_reward_head
from .model.heads import REWARD_POOLINGS, check_reward_layer, pool_response, reading_layer, save_heads
from .model.loading import check_context, enable_activation_checkpointing, load_causal_lm, load_tokenizer, unwrapped
from .model.lora import with_lora_adapters

logger = logging.getLogger(__name__)

SFT_OBJECTIVES = ("hydra", "sft", "reward")
REFIT_FEATURES = ("training", "final")


@dataclass
class SFTConfig:
    sft_objective: str = field(default="hydra", metadata={"help": f"One of {SFT_OBJECTIVES}: joint LM + reward "
                                                                 "(hydra), LM only (sft), reward only (reward)."})
    finetune: str = field(default="lora", metadata={"help": "lora (merged into the weights at the end) or full."})
    train_path: str = field(default="demo:preferences-train", metadata={
        "help": "Preference pairs: 'demo:preferences-train' (bundled), a local JSONL/Parquet file or a hub dataset."})
    eval_path: str | None = field(default="demo:preferences-eval", metadata={"help": "Held-out pairs; empty to skip."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (text or messages)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column with the preferred response."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column with the dispreferred response."})
    min_score_margin: float = field(default=0.0, metadata={
        "help": "Skip training pairs whose chosen_score - rejected_score is below this (near-ties are label noise); "
                "needs those columns. Held-out pairs are never filtered."})
    max_prompt_length: int = field(default=64, metadata={"help": "Prompts are cut from the left to this many tokens."})
    max_length: int = field(default=128, metadata={"help": "Prompt + response tokens; longer rows are truncated "
                                                          "or dropped (see truncation)."})
    truncation: str = field(default="truncate", metadata={"help": "truncate (cut the response) or drop long rows."})
    reward_weight: float = field(default=1.0, metadata={"help": "Weight of the Bradley-Terry term (hydra objective)."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the reward head."})
    reward_pooling: str = field(default="last", metadata={
        "help": "What the reward head reads: 'last' (final hidden state at the EOS, the usual reward model), "
                "'mean' or 'sum' (over the response tokens). Saved with the head; PPO reads it the same way."})
    reward_layer: int | None = field(default=None, metadata={
        "help": "Which hidden states the reward head reads: empty for the final ones (the usual reward model), N for "
                "those after the first N decoder layers (0: the token embeddings). A judge of word choice is read "
                "better low (docs/results.md). Saved with the head; PPO reads it the same way, and a pass that "
                "serves only the reward stops there."})
    refit_reward_head: bool = field(default=True, metadata={
        "help": "After training, fit the reward head to convergence (L2 logistic regression on pooled features; "
                "strength by cross-validation). Objectives with a reward term."})
    refit_features: str = field(default="training", metadata={
        "help": f"What the refit reads, one of {REFIT_FEATURES}: 'training', the features the training forwards saw "
                "(free, but only of the pairs the steps reached); 'final', one forward of every training pair "
                "through the trained model (costs that forward; covers every pair when num_epochs < 1, and reads "
                "the features the RL stage will read)."})
    num_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (fractions allowed)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "constant, linear or cosine."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps spent warming up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_pairs: int | None = field(default=None, metadata={"help": "Use only the first N held-out pairs."})
    eval_batch_size: int = field(default=16, metadata={"help": "Pairs per evaluation forward."})
    output_dir: str = field(default="runs/sft", metadata={"help": "Where the checkpoint (model + heads) goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a checkpoint already in output_dir "
                                                                     "(otherwise that is an error)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    objective: str | None = field(default=None, metadata={"help": "Deprecated: sft_objective (objective names "
                                                                  "the RL objective in the RL recipes)."})

    def __post_init__(self):
        renamed(self, "objective", "sft_objective")
        if self.sft_objective not in SFT_OBJECTIVES:
            raise ValueError(f"Unknown sft_objective {self.sft_objective!r}: use one of {', '.join(SFT_OBJECTIVES)}.")
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"Unknown finetune {self.finetune!r}: use lora or full.")
        if self.reward_pooling not in REWARD_POOLINGS:
            raise ValueError(f"Unknown reward_pooling {self.reward_pooling!r}: use one of {', '.join(REWARD_POOLINGS)}.")
        if self.refit_features not in REFIT_FEATURES:
            raise ValueError(f"Unknown refit_features {self.refit_features!r}: use one of {', '.join(REFIT_FEATURES)}.")
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"Unknown truncation {self.truncation!r}: use truncate or drop.")
        check_positive(self, "learning_rate", "head_learning_rate", "num_epochs")
        check_positive(self, "reward_weight", "max_grad_norm", "min_score_margin", "reward_layer", allow_zero=True)
        check_at_least_one(self, "batch_size", "eval_batch_size", "max_length", "max_prompt_length", "max_train_pairs",
                           "max_eval_pairs")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")


# ------------------------------------------------------------------------------------------------ data


def encode_pairs(tokenizer, pairs: list[dict], config: SFTConfig) -> tuple[list[dict], Counter]:
    """Token ids per pair: ``prompt`` (templated, left-truncated), ``chosen`` and ``rejected`` (response + EOS),
    with rows over ``max_length`` truncated or dropped, and counted."""
    from .data import encode_prompts, message_text

    prompt_ids, truncated_prompts = encode_prompts(tokenizer, [p["prompt"] for p in pairs], config.max_prompt_length)
    counts = Counter({"prompt truncated": truncated_prompts} if truncated_prompts else {})
    encoded = []
    for prompt, pair in zip(prompt_ids, pairs):
        row = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            response = tokenizer(message_text(pair[key]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            room = config.max_length - len(prompt)
            if len(response) > room:
                counts[f"{key} over max_length"] += 1
                if config.truncation == "drop":
                    row = None
                    break
                response = response[: max(room, 1)]
            row[key] = response
        if row is not None:
            encoded.append(row)
    return encoded, counts


def collate(rows: list[dict], pad_id: int, keys=("chosen", "rejected")) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences for ``keys`` stacked in that order, with masks: ``input_ids``,
    ``attention_mask``, ``labels_mask`` (1 on response tokens)."""
    sequences, label_masks = [], []
    for key in keys:
        for row in rows:
            sequences.append(row["prompt"] + row[key])
            label_masks.append([0] * len(row["prompt"]) + [1] * len(row[key]))
    width = max(len(s) for s in sequences)
    pad = lambda xs, value: [x + [value] * (width - len(x)) for x in xs]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad(sequences, pad_id)),
        "attention_mask": torch.tensor(pad([[1] * len(s) for s in sequences], 0)),
        "labels_mask": torch.tensor(pad(label_masks, 0)),
    }


# ----------------------------------------------------------------------------------------------- model


class HydraSFTModel(nn.Module):
    """A causal LM (optionally LoRA-wrapped) with a scalar reward head on its pooled hidden states (the final ones,
    or those after ``reward_layer`` layers)."""

    def __init__(self, lm: nn.Module, hidden_size: int, reward_pooling: str = "last", reward_layer: int | None = None):
        super().__init__()
        self.lm = lm
        self.reward_pooling, self.reward_layer = reward_pooling, reward_layer
        # Zero init: every pair starts at margin 0, so the first steps follow the preference signal alone. A random
        # direction (std 1/sqrt(h)) costs more than a short run can undo: with the bundled model's final hidden
        # states (norm ~44), 50 steps at lr 1e-3 on frozen features reach 50% held-out from a random init, 69%
        # from zero (measured on the demo pairs).
        self.reward_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)
        self.value_head: nn.Linear | None = None  # PPO's critic start where the reward head reads an inner layer

    def heads(self) -> dict[str, nn.Linear]:
        """The heads the checkpoint stores: the reward head, and the value head's start where one was fitted."""
        return {"reward_head": self.reward_head, **({"value_head": self.value_head} if self.value_head is not None else {})}

    def forward(self, input_ids, attention_mask, labels_mask, lm_rows: int | None = None):
        """(mean LM loss on response tokens per sequence (lm_rows,), reward (N,), the features the reward head
        read (N, hidden), the final hidden states (N, T, hidden)), the last two detached.

        The LM head runs only on the first ``lm_rows`` sequences (the chosen half) and only where a response
        token is predicted: the full-vocabulary projection is the costliest part of a small model's step."""
        causal_lm = unwrapped(self.lm)
        decoder = causal_lm.get_decoder()
        with reading_layer(decoder, self.reward_layer) as read:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        features = pool_response(read.get("hidden", hidden), labels_mask, self.reward_pooling).float()
        rewards = self.reward_head(features).squeeze(-1)
        rows = len(input_ids) if lm_rows is None else lm_rows
        predicts_response = labels_mask[:rows, 1:].bool()  # position t predicts token t + 1
        logits = causal_lm.get_output_embeddings()(hidden[:rows, :-1][predicts_response]).float()
        token_loss = F.cross_entropy(logits, input_ids[:rows, 1:][predicts_response], reduction="none")
        per_sequence = torch.zeros(rows, device=hidden.device).index_add_(
            0, predicts_response.nonzero()[:, 0], token_loss)
        return per_sequence / predicts_response.sum(-1).clamp(min=1), rewards, features.detach(), hidden.detach()


def sft_loss(model: HydraSFTModel, batch: dict, objective: str, reward_weight: float
             ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One forward over [chosen; rejected]: LM loss from the chosen half, Bradley-Terry from both halves.
    Also returns the pooled features of both halves (for ``fit_reward_head``) and their final hidden states
    (for ``CriticStart``)."""
    half = len(batch["input_ids"]) // 2
    lm_loss, rewards, features, final_hidden = model(**batch, lm_rows=0 if objective == "reward" else half)
    margin = rewards[:half] - rewards[half:]
    bt_loss = -F.logsigmoid(margin).mean()
    lm = lm_loss.mean() if len(lm_loss) else torch.zeros((), device=rewards.device)
    loss = {"hydra": lm + reward_weight * bt_loss, "sft": lm, "reward": bt_loss}[objective]
    return loss, {"lm_loss": float(lm.detach()), "reward_loss": float(bt_loss.detach()),
                  "reward_accuracy": float((margin > 0).float().mean())}, features, final_hidden


@torch.no_grad()
def pooled_features(lm: nn.Module, rows: list[dict], pad_id: int, batch_size: int, poolings: tuple[str, ...],
                    layers: tuple[int | None, ...] = (None,)) -> dict[int | None, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """What a reward head reads for each pair, ``{layer: {pooling: (chosen, rejected)}}``, each (pairs, hidden):
    one forward of the decoder per batch (no LM head), the hidden states of each of ``layers`` (None: the final
    ones; N: those after N layers, as ``reward_layer``) pooled each way. Without None the forward stops at the
    highest of ``layers``."""
    from tqdm.auto import tqdm

    causal_lm = unwrapped(lm)
    decoder = causal_lm.get_decoder()
    device = next(causal_lm.parameters()).device
    stop_at = None if None in layers else max(layers)
    parts = {layer: {pooling: ([], []) for pooling in poolings} for layer in layers}
    for start in tqdm(range(0, len(rows), batch_size), desc="reward features", unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
        with ExitStack() as stack:  # the stopping read is entered last, so it is the one that ends the forward
            reads = {layer: stack.enter_context(reading_layer(decoder, layer, stop=layer == stop_at))
                     for layer in sorted(layers, key=lambda layer: -1 if layer is None else layer)}
            reads.setdefault(None, {})
            final = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            reads[None]["hidden"] = final.last_hidden_state  # not reached when a read stopped the forward
        for layer, by_pooling in parts.items():
            for pooling, (chosen, rejected) in by_pooling.items():
                c, r = pool_response(reads[layer]["hidden"], batch["labels_mask"], pooling).float().chunk(2)
                chosen.append(c)
                rejected.append(r)
    return {layer: {pooling: (torch.cat(c), torch.cat(r)) for pooling, (c, r) in by_pooling.items()}
            for layer, by_pooling in parts.items()}


@torch.no_grad()
def evaluate_sft(model: HydraSFTModel, rows: list[dict], pad_id: int, batch_size: int) -> dict:
    """Reward-head pairwise accuracy on held-out pairs (a tie counts half, so an untrained zero head scores 50%);
    LM perplexity on their chosen responses (token-weighted)."""
    model.eval()
    correct, nll, tokens = 0.0, 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id)
        half = len(batch["input_ids"]) // 2
        lm_loss, rewards, _, _ = model(**batch, lm_rows=half)
        margin = rewards[:half] - rewards[half:]
        correct += float((margin > 0).sum() + 0.5 * (margin == 0).sum())
        response_tokens = (batch["labels_mask"][:half, 1:]).sum(-1)
        nll += float((lm_loss * response_tokens).sum())
        tokens += int(response_tokens.sum())
    return {"reward_accuracy": correct / max(len(rows), 1), "perplexity": math.exp(nll / max(tokens, 1)),
            "num_pairs": len(rows)}


def build_sft_model(model_config: ModelConfig, config: SFTConfig, device) -> HydraSFTModel:
    from .model.hydra import resolve_dtype

    device = torch.device(device)
    torch.manual_seed(config.seed)
    lm = load_causal_lm(model_config.model_name_or_path, dtype=resolve_dtype(model_config.dtype, device),
                        quantization=model_config.quantization, device=device,
                        trust_remote_code=model_config.trust_remote_code)
    if config.finetune == "lora":
        lm.requires_grad_(False)
        lm = with_lora_adapters(lm, ["default"], model_config)
    elif model_config.quantization != "none":
        raise ValueError("finetune 'full' cannot train a quantized base; use finetune: lora or quantization: none.")
    if model_config.gradient_checkpointing:
        enable_activation_checkpointing(lm, use_reentrant=False)
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(lm)
    check_reward_layer(config.reward_layer, lm.config.num_hidden_layers, model_config.model_name_or_path)
    return HydraSFTModel(lm, lm.config.hidden_size, config.reward_pooling, config.reward_layer).to(device)


# ---------------------------------------------------------------------------------------------- training


def run_sft(model_config: ModelConfig, config: SFTConfig, console=None) -> dict:
    """Train, evaluate, save the checkpoint atomically; returns the summary (also in ``sft_summary.json``)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .data import load_preferences
    from .memory.profiler import wide_console

    console = console or wide_console()
    started = time.perf_counter()
    output = Path(config.output_dir)
    if output.is_dir() and any(output.iterdir()) and not config.overwrite_output_dir:
        raise ValueError(f"{output} already holds files (a checkpoint?): pass --overwrite_output_dir true to replace "
                         "it, or choose another output_dir.")
    check_context(model_config.model_name_or_path, config.max_length + 1, "max_length (+1 for the EOS)",
                  model_config.trust_remote_code)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_config.model_name_or_path, model_config.trust_remote_code)
    pairs, skipped = load_preferences(config.train_path, config.prompt_column, config.chosen_column,
                                      config.rejected_column, config.max_train_pairs, config.min_score_margin)
    rows, length_counts = encode_pairs(tokenizer, pairs, config)
    eval_rows = []
    if config.eval_path:
        eval_pairs, _ = load_preferences(config.eval_path, config.prompt_column, config.chosen_column,
                                         config.rejected_column, config.max_eval_pairs)
        eval_rows, _ = encode_pairs(tokenizer, eval_pairs, config)
    console.print(f"SFT ({config.sft_objective}, {config.finetune}): {len(rows)} training pairs, {len(eval_rows)} held-out; "
                  f"skipped {dict(skipped) or 0}; length handling {dict(length_counts) or 'none needed'}")
    if not rows:
        raise ValueError(f"{config.train_path}: no usable training pairs after skipping {dict(skipped)}.")

    model = build_sft_model(model_config, config, device)
    head = list(model.reward_head.parameters())
    body = [p for p in model.lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.learning_rate},
                                   {"params": head, "lr": config.head_learning_rate}], weight_decay=0.0)
    steps = max(1, math.ceil(len(rows) * config.num_epochs / config.batch_size))
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * steps),
                              num_training_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history, latest_features = [], {}  # pair index -> its (chosen, rejected) pooled features, latest seen
    has_reward = config.sft_objective != "sft"
    critic_start = CriticStart(model.reward_head.in_features) if has_reward and config.reward_layer is not None else None
    model.train()
    for step in tqdm(range(steps), desc=f"SFT ({config.sft_objective})"):
        if len(order) < config.batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch_indices, order = order[: config.batch_size], order[config.batch_size :]
        batch = collate([rows[i] for i in batch_indices], tokenizer.pad_token_id)
        loss, stats, features, final_hidden = sft_loss(model, batch, config.sft_objective, config.reward_weight)
        if not torch.isfinite(loss):
            logger.warning("SFT step %d: non-finite loss, step skipped.", step)
            optimizer.zero_grad(set_to_none=True)
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + head, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(loss.detach()), **stats})
        latest_features.update(zip(batch_indices, zip(*features.chunk(2))))
        if critic_start is not None:
            critic_start.add(batch_indices, final_hidden, batch["labels_mask"])

    head_fit, value_fit = {}, {}
    read = latest_features  # pair index -> the (chosen, rejected) features the reward head reads
    if config.refit_reward_head and has_reward and latest_features:
        if config.refit_features == "final":
            features = pooled_features(model.lm, rows, tokenizer.pad_token_id, config.eval_batch_size,
                                       (config.reward_pooling,), (config.reward_layer,))
            read = dict(enumerate(zip(*features[config.reward_layer][config.reward_pooling])))
        chosen, rejected = (torch.stack(half) for half in zip(*read.values()))
        head_fit = {**fit_reward_head(model.reward_head, chosen, rejected), "features": config.refit_features}
        console.print(f"reward head refit on {head_fit['pairs']} training pairs ({config.refit_features} features): "
                      f"L2 {head_fit['l2']}, cross-validated accuracy {head_fit['cv_accuracy']:.1%}")
    if critic_start is not None and latest_features:
        model.value_head = nn.Linear(model.reward_head.in_features, 1).to(device)
        value_fit = critic_start.fit(model.value_head, lambda pairs: tuple(
            model.reward_head(torch.stack(half)).squeeze(-1) for half in zip(*(read[i] for i in pairs))))
        console.print(f"value head start fitted to the reward head's scores on {value_fit['sequences']} sequences' "
                      f"final hidden states: R^2 {value_fit['r2']:.2f} over {value_fit['states']} states")
    results = evaluate_sft(model, eval_rows, tokenizer.pad_token_id, config.eval_batch_size) if eval_rows else {}
    summary = {"objective": config.sft_objective, "finetune": config.finetune, "train_pairs": len(rows),
               "skipped": dict(skipped), "length_handling": dict(length_counts), "steps": steps,
               "eval": results, "final_train": history[-1] if history else {}, "reward_head_fit": head_fit,
               "value_head_fit": value_fit,
               "wall_seconds": time.perf_counter() - started,
               "settings": {**asdict(model_config), **asdict(config)}}
    save_sft_checkpoint(model, model_config, tokenizer, config.output_dir, summary, history)
    if results:
        console.print(f"held-out: reward accuracy {results['reward_accuracy']:.1%}, perplexity {results['perplexity']:.2f} "
                      f"({results['num_pairs']} pairs); {summary['wall_seconds']:.0f} s")
    return summary


def save_sft_checkpoint(model: HydraSFTModel, model_config: ModelConfig, tokenizer, output_dir, summary, history) -> Path:
    """A plain model directory (LoRA merged) + reward head + summary, written atomically (``checkpoints.py``)."""
    from .checkpoints import write_atomically

    def write(staging: Path) -> None:
        merged = _merged_lm(model.lm, model_config)
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        heads = {f"{name}.{k}": v.detach().cpu().contiguous() for name, head in model.heads().items()
                 for k, v in head.state_dict().items()}
        save_heads(heads, staging, model.reward_pooling, model.reward_layer)
        (staging / "sft_summary.json").write_text(json.dumps(summary, indent=2))
        (staging / "sft_history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    return write_atomically(Path(output_dir), write)


def _merged_lm(lm: nn.Module, model_config: ModelConfig) -> nn.Module:
    """The LM with LoRA folded in. A quantized base is reloaded unquantized first (an exact merge needs it)."""
    if not hasattr(lm, "merge_and_unload"):
        return lm
    if model_config.quantization == "none":
        return lm.merge_and_unload()
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter_state = get_peft_model_state_dict(lm)
    plain = load_causal_lm(model_config.model_name_or_path, dtype=torch.float32)
    plain.requires_grad_(False)
    wrapped = with_lora_adapters(plain, ["default"], model_config)
    set_peft_model_state_dict(wrapped, adapter_state)
    return wrapped.merge_and_unload()
