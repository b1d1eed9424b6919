"""Regenerate the bundled demo data (prompts and VADER-labelled preference pairs), deterministically.

Exact command that produced ``hydra_rlhf/demo_data`` (about 35 minutes on a 2-core CPU; DATA_CARD.md has the time)::

    python recipes/make_demo_data.py --out hydra_rlhf/demo_data

Quick smoke run (a handful of prompts; write it somewhere else so the bundled files stay intact)::

    python recipes/make_demo_data.py --out /tmp/demo_data --limit 8

The task is an "upbeat, friendly assistant" (see ``hydra_rlhf/judge.py``). What this script does:

1. Builds everyday user requests (cooking, houseplants, commuting, budgeting, exercise, pets, weekend
   plans, studying, travel, small repairs, weather, hobbies, friendships, work, ...) by combining topic
   phrases with question templates; deduplicates, shuffles with ``--seed`` and splits into disjoint train
   and eval sets (no prompt text in both; the eval set does not depend on ``--num-train``).
2. For each pair (``--pairs-per-prompt`` per training prompt, one per eval prompt), samples the bundled
   SmolLM2-135M-Instruct twice, once under an upbeat and once under a
   gloomy system prompt (RLCD-style contrast; :data:`CONTRAST_SYSTEM_PROMPTS`), with the chat template,
   temperature 1.0, top_p 0.95, no top-k, ``--max-new-tokens`` new tokens, left-padded batches of
   ``--batch-size`` prompts, each generate call seeded.
3. Scores both responses with the gold judge (VADER compound of the response text). The higher one is
   ``chosen``, the lower one ``rejected``. Pairs with equal scores, equal texts or an empty response are
   skipped and counted.
4. Writes into ``--out``:

   - ``demo_prompts_{train,eval}.jsonl``: ``{"prompt": str}`` for every prompt (skipped pairs included);
   - ``demo_preferences_{train,eval}.jsonl``: TRL "standard" preference rows plus the judge's scores,
     ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}``;
   - ``DATA_CARD.md``: task, judge, recipe, counts and mean scores (documentation; not package data).

Sampling is deterministic for a given seed, torch build and thread count; a different CPU or torch
version can produce different samples (the prompts themselves depend only on the seed).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

# Gerund phrases: "Any tips for <topic>?". Grouped by theme only for readability.
TOPICS: dict[str, list[str]] = {
    "cooking": [
        "cooking a quick weeknight dinner",
        "baking my first loaf of bread",
        "meal prepping lunches for the week",
        "making a good cup of coffee at home",
        "cooking rice so it isn't mushy",
        "using up leftover vegetables",
        "making soup from scratch",
    ],
    "houseplants": [
        "keeping basil alive on a windowsill",
        "caring for a snake plant",
        "repotting a root-bound houseplant",
        "growing tomatoes on a small balcony",
        "watering succulents the right amount",
        "choosing plants for a dim apartment",
    ],
    "commuting": [
        "commuting to work by bike",
        "making a long train commute more pleasant",
        "taking the bus to a new job",
        "carpooling with coworkers",
        "walking to work in the city",
    ],
    "budgeting": [
        "sticking to a monthly budget",
        "saving up for a vacation",
        "cutting down my grocery bill",
        "tracking my everyday spending",
        "building a small emergency fund",
    ],
    "exercise": [
        "starting to run in the mornings",
        "stretching after a workout",
        "building a simple home workout routine",
        "getting back into swimming",
        "walking more during the day",
        "trying yoga for the first time",
    ],
    "pets": [
        "training a puppy to sit",
        "introducing a new cat to my home",
        "keeping a goldfish tank clean",
        "walking an energetic dog",
        "choosing toys for a kitten",
    ],
    "weekend plans": [
        "planning a relaxing weekend at home",
        "organizing a picnic with friends",
        "spending a Saturday exploring my own town",
        "planning a rainy Sunday indoors",
    ],
    "studying": [
        "studying for a math exam",
        "learning vocabulary in a new language",
        "taking better notes in class",
        "staying focused while studying at home",
        "preparing a short class presentation",
    ],
    "travel": [
        "packing light for a weekend trip",
        "planning a road trip with family",
        "getting over jet lag",
        "traveling on a small budget",
        "visiting a museum with kids",
    ],
    "small repairs": [
        "fixing a squeaky door hinge",
        "unclogging a slow bathroom sink",
        "patching a small hole in drywall",
        "replacing a bike inner tube",
        "hanging a picture frame straight",
        "tightening a wobbly chair",
    ],
    "weather": [
        "dressing for a chilly autumn morning",
        "staying cool during a hot summer week",
        "getting ready for a snowy day",
        "planning a hike when rain is forecast",
    ],
    "hobbies": [
        "learning to knit a scarf",
        "getting started with watercolor painting",
        "picking up the guitar as an adult",
        "taking better photos with my phone",
        "starting a small vegetable garden",
        "reading more books this year",
        "keeping a daily journal",
    ],
    "friendships": [
        "keeping in touch with old friends",
        "planning a birthday surprise for a friend",
        "making friends after moving to a new town",
        "hosting a board game night",
        "writing a thank-you note to a neighbor",
    ],
    "work": [
        "preparing for a job interview",
        "organizing my email inbox",
        "running a short team meeting",
        "asking my manager for feedback",
        "working from home without distractions",
        "starting a new job next week",
    ],
    "home": [
        "building a calm morning routine",
        "going to bed a bit earlier",
        "decluttering a small closet",
        "cleaning the kitchen quickly after dinner",
        "doing laundry so colors don't fade",
    ],
}

TEMPLATES: list[str] = [
    "Any tips for {t}?",
    "What's the best way to go about {t}?",
    "Can you give me some advice on {t}?",
    "I'm new to {t}. Where should I start?",
    "What are some common mistakes people make when {t}?",
    "How can I get better at {t}?",
    "What should I keep in mind when {t}?",
    "Could you share a few simple ideas for {t}?",
    "I've been thinking about {t}. Any suggestions?",
    "What do I need to know before {t}?",
    "Give me a short checklist for {t}.",
    "What's an easy first step for {t}?",
    "My friend asked me about {t}. What should I tell them?",
    "Can you explain the basics of {t} in a few sentences?",
    "Do you have any advice for someone who is {t}?",
    "I need help with {t}. What would you recommend?",
]

TRAIN_FILE = "demo_prompts_train.jsonl"
EVAL_FILE = "demo_prompts_eval.jsonl"
PREFS_TRAIN_FILE = "demo_preferences_train.jsonl"
PREFS_EVAL_FILE = "demo_preferences_eval.jsonl"


def all_prompts() -> list[str]:
    """Every topic x template combination, deduplicated, in a fixed (unshuffled) order."""
    seen: dict[str, None] = {}
    for topics in TOPICS.values():
        for topic in topics:
            for template in TEMPLATES:
                seen.setdefault(" ".join(template.format(t=topic).split()), None)
    return list(seen)


# The held-out prompts are the block of the shuffled pool right after the first 400, where the first version of
# the data (400 train prompts) put them: a larger training set takes the prompts on both sides of that block, so
# the held-out prompts, and every held-out figure measured on them, stay the same whatever --num-train is.
EVAL_START = 400


def build_prompts(num_train: int = 400, num_eval: int = 100, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train and eval prompt lists, shuffled with ``seed``; the same seed gives the same lists, and the
    eval list does not depend on ``num_train``."""
    pool = all_prompts()
    if num_train + num_eval > len(pool):
        raise ValueError(f"Asked for {num_train} + {num_eval} prompts but only {len(pool)} distinct ones exist.")
    random.Random(seed).shuffle(pool)
    start = min(EVAL_START, len(pool) - num_eval)
    evals = pool[start : start + num_eval]
    return (pool[:start] + pool[start + num_eval :])[:num_train], evals


# ------------------------------------------------------------------------------------------------ generation


# RLCD-style contrast (Yang et al. 2023, arXiv 2307.12950): the two samples of a pair come from two
# opposite system prompts, so pairs differ in tone rather than by sampling noise alone. The system prompts
# are only a way to get varied samples: the label still comes from the gold judge, and the bundled rows
# store the plain user prompt (no system prompt), which is what the reward head and the policy see.
CONTRAST_SYSTEM_PROMPTS: tuple[str, str] = (
    "You are a cheerful, upbeat and friendly assistant. Answer warmly, with enthusiasm and encouragement.",
    "You are a gloomy, pessimistic assistant. Point out what can go wrong and how hard things are.",
)


# Round r of pairs draws with seed + r * ROUND_SEED_STRIDE: round 0 is the first version's sampling, and no two
# rounds' generate calls share a seed (a round has far fewer than ROUND_SEED_STRIDE / 2 batches).
ROUND_SEED_STRIDE = 1000


def sample_pairs(model, tokenizer, prompts, *, max_new_tokens, batch_size, seed, desc):
    """Two sampled responses per prompt, one under each contrast system prompt: (upbeat, gloomy) tuples."""
    import torch
    from tqdm import tqdm

    def sample(batch, system, batch_seed):
        inputs = tokenizer.apply_chat_template(
            [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in batch],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            padding=True,
        )
        torch.manual_seed(batch_seed)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [t.strip() for t in texts]

    pairs = []
    starts = range(0, len(prompts), batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch")):
        batch = prompts[start : start + batch_size]
        upbeat, gloomy = (sample(batch, system, seed + 2 * batch_index + k) for k, system in enumerate(CONTRAST_SYSTEM_PROMPTS))
        pairs.extend(zip(upbeat, gloomy, strict=True))
    return pairs


def label_pairs(prompts, pairs):
    """Score with the gold judge; return (rows, skip counts). Higher VADER compound is chosen."""
    from hydra_rlhf.judge import gold_scores

    rows, skipped = [], {"empty": 0, "same_text": 0, "tied_score": 0}
    for prompt, (a, b) in zip(prompts, pairs, strict=True):
        if not a or not b:
            skipped["empty"] += 1
            continue
        if a == b:
            skipped["same_text"] += 1
            continue
        sa, sb = gold_scores([a, b])
        if sa == sb:
            skipped["tied_score"] += 1
            continue
        (chosen, cs), (rejected, rs) = sorted([(a, sa), (b, sb)], key=lambda x: x[1], reverse=True)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_score": cs, "rejected_score": rs})
    return rows, skipped


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def split_stats(prompts, pairs, rows, skipped) -> dict:
    from hydra_rlhf.judge import distinct_n, gold_scores

    responses = [r for pair in pairs for r in pair]  # upbeat, gloomy, upbeat, gloomy, ...
    scores = gold_scores(responses)
    return {
        "prompts": len(prompts),
        "pairs": len(rows),
        "skipped": skipped,
        "mean_chosen": _mean([r["chosen_score"] for r in rows]),
        "mean_rejected": _mean([r["rejected_score"] for r in rows]),
        "mean_all_samples": _mean(scores),
        "distinct_2": distinct_n(responses, 2),
        "small_margin": sum(r["chosen_score"] - r["rejected_score"] < 0.05 for r in rows),
        "median_margin": statistics.median(r["chosen_score"] - r["rejected_score"] for r in rows) if rows else float("nan"),
        "upbeat_won": sum(a > b for a, b in zip(scores[0::2], scores[1::2])),
    }


# The card also documents the arithmetic task (recipes/make_arithmetic_data.py), written by hand: a rerun of this
# script rewrites its own part and keeps everything from this heading on.
KEPT_SECTION = "## Arithmetic word problems"


def kept_sections(card: Path) -> str:
    """The hand-written tail of an existing card (from :data:`KEPT_SECTION` on), or nothing."""
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    return "\n" + text[text.index(KEPT_SECTION):] if KEPT_SECTION in text else ""


def data_card(args, stats: dict, seconds: float) -> str:
    def line(name):
        s = stats[name]
        sk = s["skipped"]
        return (
            f"| {name} | {s['prompts']} | {s['pairs']} | {sk['tied_score']} / {sk['same_text']} / {sk['empty']} | "
            f"{s['mean_chosen']:+.4f} | {s['mean_rejected']:+.4f} | {s['median_margin']:.3f} | {s['upbeat_won']} | "
            f"{s['mean_all_samples']:+.4f} | {s['distinct_2']:.3f} |"
        )

    return f"""# Demo data card

Bundled data for the offline demo, in `hydra_rlhf/demo_data/`. Only the `*.jsonl` files ship in the package.

## Task and judge
The task is an **upbeat, friendly assistant**: answer ordinary, neutral everyday requests ("Any tips for
keeping basil alive on a windowsill?") helpfully and warmly. The gold judge is the **VADER compound
sentiment score of the response text** (`hydra_rlhf.judge.gold_scores`, PyPI `vadersentiment`), in [-1, 1].
The prompt is not part of the scored text. VADER is a lexicon: it rewards positive words, not helpfulness,
so watch `distinct_n` for reward hacking ("Great! Wonderful!" on everything).

## Files
| file | rows | format |
|---|---|---|
| `{TRAIN_FILE}` | {stats['train']['prompts']} | `{{"prompt": str}}` - PPO training prompts |
| `{EVAL_FILE}` | {stats['eval']['prompts']} | `{{"prompt": str}}` - held-out prompts (no text shared with train) |
| `{PREFS_TRAIN_FILE}` | {stats['train']['pairs']} | TRL standard preference: `prompt`, `chosen`, `rejected` + `chosen_score`, `rejected_score` |
| `{PREFS_EVAL_FILE}` | {stats['eval']['pairs']} | same, for the eval prompts |

Prompts are plain user text (no chat template applied); apply the tokenizer's chat template yourself.

## How it was made
```
python recipes/make_demo_data.py --out hydra_rlhf/demo_data --seed {args.seed} --num-train {args.num_train} \\
    --num-eval {args.num_eval} --pairs-per-prompt {args.pairs_per_prompt} --max-new-tokens {args.max_new_tokens} \\
    --batch-size {args.batch_size}
```
- Prompts: {len(TOPICS)} themes, {sum(len(v) for v in TOPICS.values())} topic phrases x {len(TEMPLATES)} question templates,
  deduplicated, shuffled with the seed, split into disjoint train / eval sets. The eval prompts are the
  100 after the first 400 of the shuffled pool, whatever `--num-train` is, so they are the same 100 as in
  the first version of this data (400 train prompts, one pair each) and held-out figures stay comparable.
- Pairs: {args.pairs_per_prompt} per training prompt (each round of pairs sampled with its own seeds), one per
  eval prompt. Several pairs per prompt rather than more prompts: the
  generator's topics and templates make {len(all_prompts())} distinct prompts, and what the reward head must learn is the
  tone of the response, which varies from sample to sample of the same prompt. The rows are in round order, the
  first round's pairs first: `max_train_pairs` up to the first round's count takes one pair per prompt.
- Responses: the bundled SmolLM2-135M-Instruct (fp32, CPU), two samples per pair, temperature 1.0,
  top_p 0.95, no top-k, at most {args.max_new_tokens} new tokens (so many responses stop mid-sentence,
  exactly as PPO rollouts of that length would), batches of {args.batch_size} prompts, each generate call
  seeded (`torch.manual_seed(seed + {ROUND_SEED_STRIDE} * round + 2 * batch index + k)`; eval: seed + 1,000,000).
- Contrast (RLCD, Yang et al. 2023): sample 1 is drawn under the system prompt
  "{CONTRAST_SYSTEM_PROMPTS[0]}", sample 2 under
  "{CONTRAST_SYSTEM_PROMPTS[1]}". A 135M model follows them only loosely, so the pairs differ in tone
  more than two plain samples would, yet the gold judge still decides (column "upbeat won": how often it
  preferred sample 1). The system prompts are not stored: rows hold the plain user prompt.
- Labels: the higher VADER compound is `chosen`, the lower `rejected`. Pairs with tied scores, identical
  texts or an empty response are dropped (the prompt stays in the prompt file).
- Generation + scoring wall time: {seconds / 60:.1f} min (torch {stats['torch']}, {stats['threads']} threads); it
  depends on machine load: an idle 2-core CPU does a batch of 32 pairs (64 samples) in about 22 s.

## Counts and scores
| split | prompts | pairs kept | skipped: tied / same text / empty | mean chosen | mean rejected | median margin | upbeat won | mean of all samples | distinct-2 of samples |
|---|---|---|---|---|---|---|---|---|---|
{line('train')}
{line('eval')}

"mean of all samples" is the untrained model's mean gold score over both contrast conditions (not a
baseline for the plain prompt; `hydra_rlhf.evaluate` decodes greedily without a system prompt). Distinct-2 falls as the number of
samples grows, so compare it only between equal-sized sets.

## Caveats
- Labels are one VADER comparison of two samples: {stats['train']['small_margin']} train / {stats['eval']['small_margin']} eval pairs
  differ by less than 0.05: such labels say little about the text, so expect held-out reward accuracy below 100%.
- Most responses are cut off at {args.max_new_tokens} tokens; a 135M model at temperature 1.0 is often off-topic.
  The data is for exercising the pipeline and measuring a sentiment shift, not for quality.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("hydra_rlhf/demo_data"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1196, help="training prompts (at most 1196: every prompt "
                        "the generator makes, less the held-out ones)")
    parser.add_argument("--num-eval", type=int, default=100, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--pairs-per-prompt", type=int, default=2, help="contrast pairs per training prompt, "
                        "each drawn with its own seeds (held-out prompts: one)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (x2 samples)")
    parser.add_argument("--model", default="smollm2-135m", help="model to sample from (default: bundled)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each split")
    args = parser.parse_args(argv)
    if args.pairs_per_prompt < 1:
        parser.error(f"--pairs-per-prompt must be at least 1, got {args.pairs_per_prompt}")

    import torch

    from hydra_rlhf.model.loading import load_causal_lm, load_tokenizer

    train, evals = build_prompts(args.num_train, args.num_eval, args.seed)
    if args.limit is not None:
        train, evals = train[: args.limit], evals[: args.limit]
    print(f"{len(train)} train prompts, {len(evals)} eval prompts (seed {args.seed})")

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model).eval()

    started = time.perf_counter()
    stats = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    outputs = {}
    # Held-out prompts keep one pair each: the held-out pairs stay the ones every earlier accuracy was measured on.
    for name, prompts, seed, rounds in (("train", train, args.seed, args.pairs_per_prompt),
                                        ("eval", evals, args.seed + 1_000_000, 1)):
        pairs = []
        for round_index in range(rounds):
            pairs += sample_pairs(
                model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                seed=seed + ROUND_SEED_STRIDE * round_index, desc=f"{name} pairs {round_index + 1}/{rounds}",
            )
        rows, skipped = label_pairs(prompts * rounds, pairs)
        stats[name] = split_stats(prompts, pairs, rows, skipped)
        outputs[name] = (prompts, rows)
    seconds = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / TRAIN_FILE, [{"prompt": p} for p in outputs["train"][0]])
    write_jsonl(args.out / EVAL_FILE, [{"prompt": p} for p in outputs["eval"][0]])
    write_jsonl(args.out / PREFS_TRAIN_FILE, outputs["train"][1])
    write_jsonl(args.out / PREFS_EVAL_FILE, outputs["eval"][1])
    card = args.out / "DATA_CARD.md"
    card.write_text(data_card(args, stats, seconds) + kept_sections(card), encoding="utf-8")

    for name in ("train", "eval"):
        s = stats[name]
        print(
            f"{name}: {s['prompts']} prompts, {s['pairs']} pairs kept, skipped {s['skipped']}; "
            f"mean chosen {s['mean_chosen']:+.4f}, mean rejected {s['mean_rejected']:+.4f}, "
            f"mean of all samples {s['mean_all_samples']:+.4f}, distinct-2 {s['distinct_2']:.3f}"
        )
    print(f"generation + scoring: {seconds:.0f} s ({seconds / 60:.1f} min); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
