"""The bundled arithmetic task: its generator (recipes/make_arithmetic_data.py), the committed files, the configs
that train on it, and ``evaluate.answer_accuracy``. Only a tiny random model is loaded."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import hydra_rlhf
from hydra_rlhf import evaluate
from hydra_rlhf.data import load_rows

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(hydra_rlhf.__file__).parent / "demo_data"
FILES = {"train": "arithmetic_train.jsonl", "eval": "arithmetic_eval.jsonl"}
CONFIGS = {"ppo": (32, 1), "grpo": (8, 4), "rloo": (8, 4), "online_dpo": (16, 2)}  # prompts x samples = 32


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("make_arithmetic_data", ROOT / "recipes" / "make_arithmetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(split):
    with open(DATA / FILES[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rerun_is_byte_identical(recipe, tmp_path):
    recipe.main(["--out", str(tmp_path)])
    for name in FILES.values():
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_sizes_columns_and_answers():
    train, held_out = read("train"), read("eval")
    assert len(train) >= 1000 and len(held_out) >= 200
    for row in train + held_out:
        assert set(row) == {"prompt", "answer", "a", "b", "operation", "template"}
        assert row["prompt"].endswith('End with "The answer is" and the number.')
        solve = {"add": row["a"] + row["b"], "subtract": row["a"] - row["b"], "multiply": row["a"] * row["b"]}
        assert row["answer"] == str(solve[row["operation"]]) and int(row["answer"]) > 0
    assert {row["operation"] for row in held_out} == {"add", "subtract", "multiply"}


def test_held_out_is_disjoint_by_text_and_by_problem():
    train, held_out = read("train"), read("eval")
    for rows in (train, held_out):
        assert len({row["prompt"] for row in rows}) == len(rows)
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}
    problem = lambda row: (row["operation"], row["a"], row["b"])  # noqa: E731
    assert not {problem(row) for row in train} & {problem(row) for row in held_out}


def test_other_seed_other_rows(recipe):
    assert recipe.generate(seed=1, num_train=50, num_eval=20) != recipe.generate(seed=0, num_train=50, num_eval=20)


def test_bundled_names_load():
    assert len(load_rows("arithmetic:train")) == len(read("train"))
    assert load_rows("arithmetic:eval")[0]["answer"] == read("eval")[0]["answer"]


def test_prompts_fit_the_configs_prompt_length(tokenizer):
    """The configs' max_prompt_length keeps every chat-templated prompt whole (64 would cut system prompts)."""
    config = yaml.safe_load((ROOT / "recipes" / "configs" / "ppo_arithmetic.yaml").read_text())
    longest = max(len(tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
                  for row in read("train") + read("eval"))
    assert longest <= config["max_prompt_length"]


@pytest.mark.parametrize("objective", list(CONFIGS))
def test_configs_share_one_budget(objective):
    config = yaml.safe_load((ROOT / "recipes" / "configs" / f"{objective}_arithmetic.yaml").read_text())
    prompts, samples = CONFIGS[objective]
    assert (config["objective"], config["batch_size"], config.get("num_samples_per_prompt", 1)) == (
        objective, prompts, samples)
    assert config["prompts_path"] == "arithmetic:train" and config["eval_prompts_path"] == "arithmetic:eval"
    assert config["model_name_or_path"] == "smollm2-135m" and config["reward_head_weight"] == 0
    assert "accuracy" in config["reward_funcs"] and len(config["reward_weights"]) == len(config["reward_funcs"])
    assert config["stop_at_kl"] is None


def test_configs_run_equally_long():
    """The same responses per run for every objective: iterations and passes over each batch, as the headers say."""
    texts = {name: (ROOT / "recipes" / "configs" / f"{name}_arithmetic.yaml").read_text() for name in CONFIGS}
    configs = {name: yaml.safe_load(text) for name, text in texts.items()}
    assert len({(config["max_iterations"], config["num_epochs"]) for config in configs.values()}) == 1
    iterations = configs["ppo"]["max_iterations"]
    for name, text in texts.items():
        header = text.split("\nmodel_name")[0]
        assert f"32 responses per iteration, {iterations} iterations" in header, name


def test_answer_accuracy_counts(monkeypatch, tiny_model, tokenizer):
    """Scoring through a stub sampler: known texts, known verdicts (a random model would score ~0 anyway)."""
    texts = ["So 3 + 4 = 7. The answer is 7.", "The answer is 8.", "Ben has 12 eggs left.", "The answer is N."]
    seen = {}

    def stub(model, tokenizer, prompts, role, *args):
        seen["role"] = role
        return texts, [SimpleNamespace(response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]] * 2))]

    monkeypatch.setattr(evaluate, "sample_responses", stub)
    prompts = [[{"role": "user", "content": f"Problem {i}"}] for i in range(4)]
    result = evaluate.answer_accuracy(None, tokenizer, prompts, ["7", "9", "12", "5"], role="reference")
    assert (result["correct"], result["total"], result["accuracy"], seen["role"]) == (2, 4, 0.5, "reference")
    assert result["mean_length"] == 2.5
    with pytest.raises(ValueError, match="answers"):
        evaluate.answer_accuracy(None, tokenizer, prompts, ["7"])


def test_answer_accuracy_runs_on_a_tiny_model(tiny_model, tokenizer):
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model import HydraModel

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model), critic=False)
    rows = read("eval")[:3]
    prompts = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    result = evaluate.answer_accuracy(model, tokenizer, prompts, [row["answer"] for row in rows], max_new_tokens=4,
                                      max_prompt_length=96, role="policy")
    assert result["total"] == 3 and 0 <= result["correct"] <= 3 and 0 < result["mean_length"] <= 4
