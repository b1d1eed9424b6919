"""Generate the bundled arithmetic word problems (the verifiable-reward task), deterministically.

Exact command that produced ``hydra_rlhf/demo_data/arithmetic_{train,eval}.jsonl`` (a second, no model, no network)::

    python recipes/make_arithmetic_data.py --out hydra_rlhf/demo_data

Why word problems with small numbers: the bundled SmolLM2-135M-Instruct gets roughly a third of them right
when decoding greedily, so a short CPU run has room to gain and a reward that is often 1 (bare "a + b" with
one-digit numbers is already ~54%, two-digit ~8%: too easy or too hard to show a gain).

Each row: ``prompt`` (user text ending with :data:`INSTRUCTION`), ``answer`` (the number as a string, which the
``accuracy`` reward compares with the completion's final answer through math-verify), ``a``, ``b``,
``operation`` (``add``, ``subtract``, ``multiply``) and ``template`` (its index in :data:`TEMPLATES`).
The held-out split is disjoint from training by problem, not only by text: every ``(operation, a, b)``
belongs to exactly one split, so the held-out accuracy measures arithmetic on unseen numbers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Measured on 40 held-out problems (greedy): "End with: The answer is N." 28% (the model often copies the literal
# "N"), "Give the final answer as a number." 30% (rarely says "the answer is", so the format reward has no target),
# this one 32%, and its phrase is what the built-in ``format`` reward looks for.
INSTRUCTION = 'End with "The answer is" and the number.'
NAMES = ["Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Lily", "Tom", "Emma", "Noah", "Ruby"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "stamps", "cards", "crayons",
         "eggs", "oranges", "balloons", "coins"]

# (operation, text): the text names its operands {a} and {b}, a person {name} and plural {items}.
TEMPLATES = [
    ("add", "{name} has {a} {items}. {name} buys {b} more. How many {items} does {name} have now?"),
    ("add", "There are {a} {items} in a box. {name} puts in {b} more. How many {items} are in the box now?"),
    ("add", "{name} found {a} {items} on Monday and {b} on Tuesday. How many {items} did {name} find in all?"),
    ("subtract", "{name} has {a} {items} and gives {b} to a friend. How many {items} does {name} have left?"),
    ("subtract", "There are {a} {items} on a table. {name} takes {b} of them. How many {items} are still there?"),
    ("subtract", "{name} had {a} {items} and lost {b} of them. How many {items} does {name} have now?"),
    ("multiply", "{name} has {a} bags with {b} {items} in each bag. How many {items} does {name} have in all?"),
]

# Operand ranges per operation; subtraction keeps the answer at least 1 (no negative or zero counts).
OPERANDS = {
    "add": [(a, b) for a in range(2, 21) for b in range(2, 21)],
    "subtract": [(a, b) for a in range(5, 21) for b in range(2, a)],
    "multiply": [(a, b) for a in range(2, 6) for b in range(2, 10)],
}
# How often each operation is drawn: multiplication has only 32 (a, b) pairs, so fewer of it. Greedy starting
# accuracy per operation (DATA_CARD.md): add 10%, subtract 21%, multiply 54%: the gain has most room in add.
WEIGHTS = {"add": 0.4, "subtract": 0.4, "multiply": 0.2}
SOLVE = {"add": lambda a, b: a + b, "subtract": lambda a, b: a - b, "multiply": lambda a, b: a * b}


def split_problems(rng: random.Random, eval_share: float) -> dict[str, dict[str, list]]:
    """Each operation's ``(a, b)`` pairs, shuffled and cut into train and eval, so no problem is in both."""
    splits = {"train": {}, "eval": {}}
    for operation, pairs in OPERANDS.items():
        pairs = list(pairs)
        rng.shuffle(pairs)
        cut = max(1, round(len(pairs) * eval_share))
        splits["eval"][operation], splits["train"][operation] = pairs[:cut], pairs[cut:]
    return splits


def make_row(rng: random.Random, problems: dict[str, list]) -> dict:
    """One word problem drawn from ``problems`` (operation -> its ``(a, b)`` pairs)."""
    operation = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    template = rng.choice([i for i, (op, _) in enumerate(TEMPLATES) if op == operation])
    a, b = rng.choice(problems[operation])
    text = TEMPLATES[template][1].format(a=a, b=b, name=rng.choice(NAMES), items=rng.choice(ITEMS))
    return {"prompt": f"{text} {INSTRUCTION}", "answer": str(SOLVE[operation](a, b)), "a": a, "b": b,
            "operation": operation, "template": template}


def make_rows(rng: random.Random, problems: dict[str, list], count: int) -> list[dict]:
    """``count`` rows with distinct prompt texts (a repeated draw is dropped and drawn again)."""
    rows, seen = [], set()
    while len(rows) < count:
        row = make_row(rng, problems)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def generate(seed: int = 0, num_train: int = 1200, num_eval: int = 200, eval_share: float = 0.2) -> dict[str, list]:
    """Train and eval rows; the same arguments always give the same rows."""
    rng = random.Random(seed)
    splits = split_problems(rng, eval_share)
    return {"train": make_rows(rng, splits["train"], num_train), "eval": make_rows(rng, splits["eval"], num_eval)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object a line, fixed key order and ``\\n`` endings, so a rerun is byte-identical."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("hydra_rlhf/demo_data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--num-eval", type=int, default=200)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in generate(args.seed, args.num_train, args.num_eval).items():
        write_jsonl(args.out / f"arithmetic_{split}.jsonl", rows)
        print(f"{args.out / f'arithmetic_{split}.jsonl'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
