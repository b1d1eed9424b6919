"""Held-out evaluation: the starting policy (adapters off, i.e. the SFT model) against the trained policy.

Both generate greedily for the same prompts, so the comparison is paired. Reported: the gold judge's mean
(VADER compound), the reward head's mean, win-rate of the trained policy by the gold judge (ties count
half), KL of the trained policy to the reference on its own responses, and distinct-2.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .experience import stages as experience
from .data import encode_prompts, left_pad


@torch.no_grad()
def sample_responses(model, tokenizer, prompts, role: str, max_new_tokens: int, max_prompt_length: int,
                     batch_size: int = 32, eos_token_ids=None):
    """Greedy responses of ``role`` for each prompt: (texts, list of Rollout batches)."""
    encoded, _ = encode_prompts(tokenizer, prompts, max_prompt_length)
    eos_token_ids = eos_token_ids or experience.eos_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=eos_token_ids)
    texts, batches = [], []
    model.eval()
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
        batch = experience.generate(model, ids.to(device), mask.to(device), kwargs, eos_token_ids, role=role)
        tokens = batch.responses.masked_fill(batch.response_mask == 0, tokenizer.pad_token_id)
        texts += [t.strip() for t in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        batches.append(batch)
    return texts, batches


@torch.no_grad()
def score_start(model, tokenizer, prompts, max_new_tokens: int = 48, max_prompt_length: int = 64,
                batch_size: int = 32, eos_token_ids=None) -> dict:
    """The starting policy's side of the comparison (adapters off: the SFT model): greedy responses, their gold
    scores and reward-head scores. Training never changes it, so every checkpoint of a run can share it."""
    from .judge import gold_scores

    texts, batches = sample_responses(model, tokenizer, prompts, "reference", max_new_tokens, max_prompt_length,
                                      batch_size, eos_token_ids)
    eos = tokenizer.eos_token_id
    rewards = [r for batch in batches
               for r in model.rewards(*experience.closed_with_eos(batch, eos), batch.prompt_len).tolist()]
    return {"texts": texts, "gold": gold_scores(texts), "rewards": rewards}


@torch.no_grad()
def evaluate(model, tokenizer, prompts, max_new_tokens: int = 48, max_prompt_length: int = 64,
             batch_size: int = 32, eos_token_ids=None, samples_to_keep: int = 5, start: dict | None = None) -> dict:
    """The trained policy against the start (``score_start``'s result, computed here unless given)."""
    from .judge import distinct_n, gold_scores

    start = start or score_start(model, tokenizer, prompts, max_new_tokens, max_prompt_length, batch_size,
                                 eos_token_ids)
    before, gold_before, rewards_before = start["texts"], start["gold"], start["rewards"]
    after, batches = sample_responses(model, tokenizer, prompts, "policy", max_new_tokens, max_prompt_length,
                                      batch_size, eos_token_ids)
    gold_after = gold_scores(after)
    eos = tokenizer.eos_token_id
    kls, rewards_after = [], []
    for batch in batches:
        experience.score_frozen(model, batch, 1.0, eos)
        logprobs = model.policy_scores(batch.input_ids, batch.attention_mask, batch.prompt_len).logprobs  # no critic
        kls += ((logprobs - batch.ref_logprobs) * batch.response_mask).sum(-1).tolist()
        rewards_after += batch.raw_scores.tolist()
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold_after, gold_before)]
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {
        "num_prompts": len(prompts),
        "gold_before": mean(gold_before),
        "gold_after": mean(gold_after),
        "gold_gain": mean(gold_after) - mean(gold_before),
        "win_rate_vs_sft": mean(wins),
        "reward_head_before": mean(rewards_before),
        "reward_head_after": mean(rewards_after),
        "kl_to_reference": mean(kls),
        "distinct2_before": distinct_n(before, 2),
        "distinct2_after": distinct_n(after, 2),
        "gold_per_prompt": {"before": gold_before, "after": gold_after},  # the paired comparison, prompt by prompt
        "samples": [
            {"prompt": p[-1]["content"], "before": b, "after": a, "gold_before": gb, "gold_after": ga}
            for p, b, a, gb, ga in list(zip(prompts, before, after, gold_before, gold_after))[:samples_to_keep]
        ],
    }


@torch.no_grad()
def score_with_sources(model, tokenizer, rows, scorer, role: str, max_new_tokens: int = 48,
                       max_prompt_length: int = 64, batch_size: int = 32, eos_token_ids=None) -> dict:
    """``role``'s greedy responses on ``rows`` ("reference": the start, adapters off; "policy": the trained
    actor), scored by ``scorer``'s sources: the texts, the weighted sum's mean (``reward``) and each source's mean
    over the rows it applied to (None where it applied to none)."""
    texts, batches = sample_responses(model, tokenizer, rows.prompts, role, max_new_tokens, max_prompt_length,
                                      batch_size, eos_token_ids)
    combined, per_source, start = [], [], 0
    for batch in batches:
        if scorer.config.head_weight:  # the head's score, read in the adapters-off pass as in training
            experience.score_frozen(model, batch, 1.0, tokenizer.eos_token_id)
        else:
            batch.raw_scores = torch.zeros(len(batch.input_ids), device=batch.input_ids.device)
        scorer.score(batch, list(range(start, start + len(batch.input_ids))))
        start += len(batch.input_ids)
        combined.append(batch.raw_scores.cpu())
        per_source.append(batch.source_scores.cpu())
    sources = torch.cat(per_source)
    result = {"texts": texts, "reward": float(torch.cat(combined).mean())}
    for column, name in enumerate(scorer.names):
        applied = sources[:, column][~sources[:, column].isnan()]
        result[name] = float(applied.mean()) if len(applied) else None
    return result


@torch.no_grad()
def evaluate_rewards(model, tokenizer, rows, scorer, max_new_tokens: int = 48, max_prompt_length: int = 64,
                     batch_size: int = 32, eos_token_ids=None, samples_to_keep: int = 5,
                     start: dict | None = None) -> dict:
    """The run's own reward sources on held-out prompts (``data.PromptRows``), greedy, the start (adapters off;
    ``score_with_sources``' result for the reference, computed here unless given) against the trained policy: each
    source's mean before and after (e.g. ``accuracy`` on a verifiable task) and the weighted sum's. Used instead
    of the demo's gold judge when a run has reward functions or a reward model."""
    sides = {"before": start or score_with_sources(model, tokenizer, rows, scorer, "reference", max_new_tokens,
                                                   max_prompt_length, batch_size, eos_token_ids),
             "after": score_with_sources(model, tokenizer, rows, scorer, "policy", max_new_tokens, max_prompt_length,
                                         batch_size, eos_token_ids)}
    results = {f"{key}_{side}": scored[key] for side, scored in sides.items() for key in ("reward", *scorer.names)}
    return {"num_prompts": len(rows.prompts), **results,
            "samples": [{"prompt": rows.texts[i], "before": sides["before"]["texts"][i],
                         "after": sides["after"]["texts"][i]}
                        for i in range(min(samples_to_keep, len(rows.prompts)))]}


def checkpoint_dirs(paths) -> list[Path]:
    """Checkpoint directories as given; a run's output_dir stands for all its checkpoints, oldest first."""
    from .checkpoints import saved_checkpoints

    from .model.hydra import read_manifest

    found = []
    for path in map(Path, paths):
        if (path / "checkpoints").is_dir():
            found += saved_checkpoints(path)
        else:
            read_manifest(path)  # a directory that is no checkpoint at all is a usage error, named at once
            found.append(path)
    return found


def evaluate_checkpoints(paths, rows, max_new_tokens: int = 48, max_prompt_length: int = 64, scorer=None):
    """Yield ``(path, result or None, problem or None)`` per saved HydraModel checkpoint, scored on the held-out
    ``rows`` (``data.PromptRows``) by the demo's gold judge (``evaluate``), or with ``scorer`` (a
    ``RewardScorer``: a run's reward functions) by those sources (``evaluate_rewards``). One that fails its
    checksums or cannot be loaded is reported and skipped, the others are still scored. Checkpoints on the same
    base share one model load and one scoring of the starting policy."""
    from safetensors import SafetensorError

    from .checkpoints import CHECKSUMS_FILE, verify
    from .errors import one_line
    from .model.hydra import HydraModel, read_manifest
    from .model.loading import load_tokenizer

    model = tokenizer = start = loaded = None
    for path in map(Path, paths):
        problem = verify(path) if (path / CHECKSUMS_FILE).is_file() else None  # older checkpoints have no listing
        if problem is None:
            try:
                manifest = read_manifest(path)
                if manifest != loaded:
                    model, loaded = HydraModel.from_pretrained(path), manifest
                    config = manifest["config"]
                    tokenizer = load_tokenizer(config["model_name_or_path"], config["trust_remote_code"])
                    if scorer is not None:
                        scorer.tokenizer = tokenizer  # the checkpoint's own tokenizer decodes its completions
                        start = score_with_sources(model, tokenizer, rows, scorer, "reference", max_new_tokens,
                                                   max_prompt_length)
                    else:
                        start = score_start(model, tokenizer, rows.prompts, max_new_tokens, max_prompt_length)
                else:
                    model.load_trained(path)
            except (OSError, ValueError, KeyError, SafetensorError, RuntimeError) as error:
                problem, loaded = one_line(error), None  # the next checkpoint reloads from scratch
        if problem is not None:
            yield path, None, problem
        elif scorer is not None:
            yield path, evaluate_rewards(model, tokenizer, rows, scorer, max_new_tokens, max_prompt_length,
                                         start=start), None
        else:
            yield path, evaluate(model, tokenizer, rows.prompts, max_new_tokens, max_prompt_length, start=start), None


# The demo's targets for a run's held-out figures: gold gain, win-rate against the SFT start, and the share of
# the start's distinct-2 the trained policy keeps (a gain bought by repeating one phrase does not count).
TARGETS = {"gold_gain": 0.30, "win_rate_vs_sft": 0.70, "distinct2_ratio": 0.70}


def quality(summary: dict) -> dict:
    """A finished run's held-out figures (its ``summary.json``), in the terms of the demo's targets (``TARGETS``)."""
    evaluation = summary["eval"]
    row = {
        "iterations": summary["iterations"],
        "gold_before": evaluation["gold_before"],
        "gold_gain": evaluation["gold_gain"],
        "win_rate_vs_sft": evaluation["win_rate_vs_sft"],
        "distinct2_ratio": evaluation["distinct2_after"] / max(evaluation["distinct2_before"], 1e-9),
        "kl_to_reference": evaluation["kl_to_reference"],
    }
    row["meets_targets"] = all(row[key] >= bound for key, bound in TARGETS.items())
    return row


@torch.no_grad()
def answer_accuracy(model, tokenizer, prompts: list[list[dict]], answers: list[str], max_new_tokens: int = 48,
                    max_prompt_length: int = 64, role: str = "policy", batch_size: int = 16) -> dict:
    """Held-out accuracy on a verifiable task: ``role``'s greedy responses ("policy": the trained actor,
    "reference": the start, adapters off) checked against ``answers`` by the ``accuracy`` reward itself, so the
    figure a run reports and the reward it trained on judge answers the same way. A gold answer that cannot be
    parsed counts as wrong here (the reward leaves it out instead), so ``total`` is always ``len(prompts)``.
    ``mean_length``: generated tokens per response (EOS included), to see a gain that comes with longer answers."""
    from .rewards.builtins import accuracy_reward

    if len(prompts) != len(answers):
        raise ValueError(f"answer_accuracy: {len(prompts)} prompts but {len(answers)} answers; give one answer each.")
    texts, batches = sample_responses(model, tokenizer, prompts, role, max_new_tokens, max_prompt_length, batch_size)
    correct = sum(score == 1.0 for score in accuracy_reward(texts, list(answers)))
    lengths = [n for batch in batches for n in batch.response_mask.sum(-1).tolist()]  # generated tokens
    return {"accuracy": correct / max(len(texts), 1), "correct": correct, "total": len(texts),
            "mean_length": sum(lengths) / max(len(lengths), 1)}
