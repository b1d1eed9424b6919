"""The bundled demo data and the prompt builder of recipes/make_demo_data.py. No models are loaded."""

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest

import hydra_rlhf
from hydra_rlhf.judge import gold_scores

DATA = Path(hydra_rlhf.__file__).parent / "demo_data"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "make_demo_data.py"
FILES = ["demo_prompts_train.jsonl", "demo_prompts_eval.jsonl", "demo_preferences_train.jsonl", "demo_preferences_eval.jsonl"]


def read_jsonl(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("make_demo_data", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- bundled files


def test_files_exist_and_are_small():
    for name in FILES:
        assert (DATA / name).is_file(), name
    assert sum((DATA / name).stat().st_size for name in FILES) < 2_000_000


def test_prompt_files():
    train = read_jsonl("demo_prompts_train.jsonl")
    evals = read_jsonl("demo_prompts_eval.jsonl")
    assert len(train) >= 400 and len(evals) >= 100
    for row in train + evals:
        assert set(row) == {"prompt"}
        assert isinstance(row["prompt"], str) and row["prompt"].strip()
        assert len(row["prompt"].split()) < 25
    train_set, eval_set = {r["prompt"] for r in train}, {r["prompt"] for r in evals}
    assert len(train_set) == len(train) and len(eval_set) == len(evals)  # no duplicates
    assert not train_set & eval_set  # held out


@pytest.mark.parametrize("split", ["train", "eval"])
def test_preference_files(split):
    prompts = {r["prompt"] for r in read_jsonl(f"demo_prompts_{split}.jsonl")}
    rows = read_jsonl(f"demo_preferences_{split}.jsonl")
    assert len(rows) >= 0.8 * len(prompts)  # only a few pairs are skipped
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert row["prompt"] in prompts
        assert row["chosen"] and row["rejected"]
        assert row["chosen"] != row["rejected"]
        assert row["chosen_score"] > row["rejected_score"]
        assert -1.0 <= row["rejected_score"] < row["chosen_score"] <= 1.0
    per_prompt = Counter(r["prompt"] for r in rows)
    assert max(per_prompt.values()) == (2 if split == "train" else 1)  # --pairs-per-prompt 2; held out: one
    assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == len(rows)  # no pair twice


def test_enough_training_pairs_and_held_out_prompts_disjoint():
    train = read_jsonl("demo_preferences_train.jsonl")
    evals = read_jsonl("demo_preferences_eval.jsonl")
    assert len(train) >= 2000 and len(evals) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in read_jsonl("demo_prompts_eval.jsonl")}
    # round order: the rows' prompts follow the prompt file once per round (a skipped pair leaves a gap)
    rounds = iter([r["prompt"] for r in read_jsonl("demo_prompts_train.jsonl")] * 2)
    assert all(row["prompt"] in rounds for row in train), "pairs out of round order"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_scores_match_the_judge(split):
    rows = read_jsonl(f"demo_preferences_{split}.jsonl")
    sample = random.Random(0).sample(rows, min(50, len(rows)))
    assert gold_scores([r["chosen"] for r in sample]) == [r["chosen_score"] for r in sample]
    assert gold_scores([r["rejected"] for r in sample]) == [r["rejected_score"] for r in sample]


def test_trl_standard_preference_format():
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(DATA / "demo_preferences_eval.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert isinstance(ds[0]["prompt"], str)


# -------------------------------------------------------------------------------------------- prompt builder


def test_build_prompts_counts_and_disjoint(recipe):
    train, evals = recipe.build_prompts(400, 100, seed=0)
    assert len(train) == 400 and len(evals) == 100
    assert len(set(train)) == 400 and len(set(evals)) == 100
    assert not set(train) & set(evals)
    assert all(len(p.split()) < 25 for p in train + evals)


def test_build_prompts_deterministic_for_a_seed(recipe):
    assert recipe.build_prompts(400, 100, seed=0) == recipe.build_prompts(400, 100, seed=0)
    assert recipe.build_prompts(400, 100, seed=0) != recipe.build_prompts(400, 100, seed=1)


def test_build_prompts_matches_bundled_files(recipe):
    train, evals = recipe.build_prompts(1196, 100, seed=0)
    assert [r["prompt"] for r in read_jsonl("demo_prompts_train.jsonl")] == train
    assert [r["prompt"] for r in read_jsonl("demo_prompts_eval.jsonl")] == evals


def test_held_out_prompts_do_not_depend_on_the_training_count(recipe):
    # the first version of the data had 400 training prompts: its held-out 100 stay the held-out 100
    first_train, first_evals = recipe.build_prompts(400, 100, seed=0)
    train, evals = recipe.build_prompts(1196, 100, seed=0)
    assert evals == first_evals and train[:400] == first_train
    assert len(train) == len(set(train)) == len(recipe.all_prompts()) - 100 and not set(train) & set(evals)


def test_prompt_pool_is_varied(recipe):
    pool = recipe.all_prompts()
    assert len(pool) == len(set(pool)) >= 500
    assert len(recipe.TOPICS) >= 12
    assert len(recipe.TEMPLATES) >= 10
    with pytest.raises(ValueError):
        recipe.build_prompts(len(pool), 1)


def test_label_pairs_skips_and_orders(recipe):
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    pairs = [
        ("What a lovely, happy idea!", "The pot is brown."),  # kept, first is chosen
        ("The pot is brown.", "I love this, wonderful!"),  # kept, second is chosen
        ("Same text.", "Same text."),  # same text
        ("", "Great!"),  # empty
        ("The pot is brown.", "The table is wooden."),  # tied at 0.0
    ]
    rows, skipped = recipe.label_pairs(prompts, pairs)
    assert skipped == {"empty": 1, "same_text": 1, "tied_score": 1}
    assert [r["prompt"] for r in rows] == ["p1", "p2"]
    assert rows[0]["chosen"] == "What a lovely, happy idea!"
    assert rows[1]["chosen"] == "I love this, wonderful!"
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
