"""Reward sources in the loop: a user's function on a plain base (no Hydra head), everywhere samples are made
(the synchronous maker, the fused loop, the asynchronous generator), weighted with the head, and bad functions
ending in one line before anything half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CLI, PYTHON, run

# A reward the tests can check exactly: a tenth of the completion's token count (EOS included), and the data's
# `bonus` column added where the row has one (None elsewhere: the function does not apply there).
REWARD_FILE = '''
def length_reward(prompts, completions, completion_ids, bonus, **kwargs):
    return [len(ids) / 10 + float(b) for ids, b in zip(completion_ids, bonus)]


def picky(prompts, completions, bonus, **kwargs):
    return [None if b == 0 else 1.0 for b in bonus]


def broken(prompts, completions, **kwargs):
    raise KeyError("answer")


def short(prompts, completions, **kwargs):
    return [1.0]
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


def prompt_rows(count: int = 24):
    from hydra_rlhf.data import PromptRows

    texts = [f"Give me tip number {i}." for i in range(count)]
    return PromptRows([[{"role": "user", "content": t}] for t in texts], {"bonus": [i % 2 for i in range(count)]},
                      False, texts, {})


def make_trainer(tiny_model, tokenizer, tmp_path, objective="ppo", **overrides):
    from hydra_rlhf.config import HydraModelConfig, RLConfig
    from hydra_rlhf.layout import objective_info
    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    config = RLConfig(**{"objective": objective, "batch_size": 4, "minibatch_size": 4, "max_new_tokens": 6,
                         "max_iterations": 2, "save_every": 0, "output_dir": str(tmp_path / "run"), "seed": 3,
                         **overrides})
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4),
                                   critic=objective_info(objective).critic, reward_head=config.head_weight > 0)
    return RLTrainer(model, tokenizer, config, prompt_rows())


def expected_scores(trainer, rollout, iteration: int = 0) -> torch.Tensor:
    """What length_reward gives the rollout's rows: their response lengths / 10 plus their prompts' bonus."""
    k = trainer.config.samples_per_prompt
    bonus = torch.tensor([i % 2 for i in trainer.experience.batch(iteration)]).repeat_interleave(k).float()
    return rollout.response_mask.sum(-1).float() / 10 + bonus


@pytest.mark.parametrize("fusion", [False, True])
def test_a_function_is_the_reward_where_the_rows_are_scored(tiny_model, tokenizer, tmp_path, rewards_file, fusion):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, reward_funcs=[f"{rewards_file}:length_reward"],
                           fusion=fusion)
    try:
        rollout, metrics = trainer.experience.make(trainer.model, 0)
    finally:
        trainer.profiler.close()
    assert torch.allclose(rollout.raw_scores, expected_scores(trainer, rollout))
    assert rollout.source_scores.shape == (4, 1)
    assert metrics["reward/length_reward/mean"] == pytest.approx(float(rollout.raw_scores.mean()), abs=1e-6)
    assert "reward/head/mean" not in metrics  # the head has weight 0: never read


def test_the_head_and_functions_are_weighted_and_none_leaves_a_source_out(tiny_model, tokenizer, tmp_path,
                                                                          rewards_file):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, reward_head_weight=0.5,
                           reward_funcs=[f"{rewards_file}:length_reward", f"{rewards_file}:picky"],
                           reward_weights=[2.0, -1.0])
    try:
        rollout, metrics = trainer.experience.make(trainer.model, 0)
    finally:
        trainer.profiler.close()
    head, lengths, picky = rollout.source_scores.unbind(1)
    assert torch.allclose(lengths, expected_scores(trainer, rollout))
    assert torch.equal(picky.isnan(), lengths == rollout.response_mask.sum(-1) / 10)  # None where bonus is 0
    expected = 0.5 * head + 2.0 * lengths - torch.nan_to_num(picky)
    assert torch.allclose(rollout.raw_scores, expected, atol=1e-6)
    assert {"reward/head/mean", "reward/length_reward/mean", "reward/picky/mean", "reward/none_applied"} <= set(metrics)


def test_the_asynchronous_generator_scores_with_the_functions_too(tiny_model, tokenizer, tmp_path, rewards_file):
    # the generator is a child process: the function travels by its spec (a file path here) and runs there
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective="rloo", num_samples_per_prompt=2,
                           reward_funcs=[f"{rewards_file}:length_reward"], async_generation=True)
    try:
        history = trainer.train()
    finally:
        trainer.profiler.close()
    assert len(history) == 2
    for metrics in history:
        assert metrics["objective/reward"] == pytest.approx(metrics["reward/length_reward/mean"], abs=1e-6)


def test_a_plain_base_gets_a_zero_value_head_and_no_warning_about_the_head(tiny_model, caplog):
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model import HydraModel

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4), reward_head=False)
    assert not model.value_head.weight.any() and not model.value_head.bias.any()
    assert "reward head is untrained" not in caplog.text
    HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4))  # the head is the reward
    assert "reward head is untrained" in caplog.text


def test_a_missing_column_is_refused_before_training(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="reward function 'accuracy' takes column 'answer', which the prompts "
                                         "data lacks"):
        make_trainer(tiny_model, tokenizer, tmp_path, reward_funcs=["accuracy"])


def test_the_recipe_trains_on_a_function_and_evaluates_with_it(tiny_model, prompts_file, tmp_path, rewards_file):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tip {i}, please.", "bonus": i % 2}) + "\n" for i in range(16)))
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": tiny_model, "prompts_path": str(data), "eval_prompts_path": str(data),
        "num_eval_prompts": 6, "batch_size": 4, "minibatch_size": 4, "max_new_tokens": 6, "max_iterations": 2,
        "save_every": 1, "lora_r": 4, "reward_funcs": [f"{rewards_file}:length_reward"],
        "output_dir": str(tmp_path / "run")}))
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config)])
    assert "reward head is untrained" not in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    evaluation = summary["eval"]
    assert {"reward_before", "reward_after", "length_reward_before", "length_reward_after"} <= set(evaluation)
    assert evaluation["reward_after"] == pytest.approx(evaluation["length_reward_after"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/length_reward/std" in m for m in metrics)
    # `hydra-rlhf evaluate --reward-funcs` scores each checkpoint with the same function: the last reproduces
    # the run's own evaluation, and the weight scales the sum, not the source's own mean
    scored = run([CLI, "evaluate", str(tmp_path / "run"), "--prompts", str(data), "--num-prompts", "6",
                  "--max-new-tokens", "6", "--reward-funcs", f"{rewards_file}:length_reward", "--reward-weights", "2",
                  "--json", str(tmp_path / "e.json")])
    assert "length_reward" in scored.stdout and "iter-000001" in scored.stdout
    per_checkpoint = json.loads((tmp_path / "e.json").read_text())
    assert [Path(p).name for p in per_checkpoint] == ["iter-000001", "iter-000002"]
    last = per_checkpoint[str(tmp_path / "run" / "checkpoints" / "iter-000002")]
    for key in ("length_reward_before", "length_reward_after"):
        assert last[key] == pytest.approx(evaluation[key], abs=1e-5), key
    assert last["reward_after"] == pytest.approx(2 * evaluation["reward_after"], abs=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--reward-funcs", "no_such_builtin"], "error: reward_funcs 'no_such_builtin'"),
    (["--reward-funcs", "accuracy"], "error: reward function 'accuracy' takes column 'answer', which the prompts data lacks"),
    (["--reward-weights", "1"], "error: --reward-weights needs --reward-funcs"),
])
def test_evaluate_refuses_bad_reward_flags_before_loading_a_model(prompts_file, tmp_path, flags, message):
    result = subprocess.run([CLI, "evaluate", str(tmp_path), "--prompts", str(prompts_file), *flags],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-1000:]


@pytest.mark.parametrize("function, message", [
    ("broken", "error: reward function 'broken' raised KeyError: 'answer'"),
    ("short", "error: reward function 'short' returned 1 values for 4 completions"),
    ("missing", "error: reward_funcs '{file}:missing': "),
])
def test_a_bad_function_ends_the_run_in_one_line_and_writes_no_checkpoint(tiny_model, prompts_file, tmp_path,
                                                                          rewards_file, function, message):
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "recipes/ppo.py", "--model_name_or_path", tiny_model, "--prompts_path",
                             str(prompts_file), "--eval_prompts_path", "", "--batch_size", "4", "--minibatch_size", "4",
                             "--max_new_tokens", "4", "--lora_r", "4", "--output_dir", str(output),
                             "--reward_funcs", f"{rewards_file}:{function}"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(file=rewards_file)), last
    assert not (output / "checkpoints").exists() and not (output / "final").exists()


def test_from_python_a_reward_function_may_be_the_function_itself(tiny_model, tokenizer, tmp_path):
    # the notebook way: define it in a cell and pass it, as TRL's reward_funcs allows
    def ends_with_eos(prompts, completions, completion_ids, **kwargs):
        return [float(ids[-1] == tokenizer.eos_token_id) for ids in completion_ids]

    trainer = make_trainer(tiny_model, tokenizer, tmp_path, reward_funcs=[ends_with_eos], save_every=1)
    try:
        metrics = trainer.step()
    finally:
        trainer.profiler.close()
    assert metrics["objective/reward"] == pytest.approx(metrics["response/eos_fraction"])
    assert metrics["reward/ends_with_eos/mean"] == pytest.approx(metrics["response/eos_fraction"])
    assert (tmp_path / "run" / "checkpoints").is_dir()  # its state saves although the config holds a function


def tiny_flags(tiny_model: str) -> list[str]:
    return ["--model_name_or_path", tiny_model, "--max_iterations", "1", "--num_eval_prompts", "4",
            "--max_new_tokens", "4", "--batch_size", "4", "--minibatch_size", "4", "--lora_layers", "1",
            "--lora_r", "4", "--max_prompt_length", "96"]


def test_the_demo_runs_the_verifiable_task(tiny_model, tmp_path):
    # the docstring's command, shrunk: a tiny base, one iteration, 4 held-out problems
    config = tmp_path / "grpo.yaml"
    config.write_text(open("recipes/configs/grpo_arithmetic.yaml").read()
                      + f"\nmodel_name_or_path: {tiny_model}\nmax_iterations: 1\nnum_eval_prompts: 4\n"
                        "max_new_tokens: 4\nlora_layers: 1\nlora_r: 4\nbatch_size: 2\nminibatch_size: 8\n")
    output = tmp_path / "arithmetic"
    run([PYTHON, "recipes/demo.py", "--task", "arithmetic", "--objective", "grpo", "--ppo_config", str(config),
         "--output_dir", str(output)])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["num_eval_prompts"] == 4
    assert 0 <= summary["accuracy_before"] <= 1 and 0 <= summary["accuracy_after"] <= 1
    assert summary["accuracy_gain"] == pytest.approx(summary["accuracy_after"] - summary["accuracy_before"])
    assert summary["frozen_base_unchanged"] and summary["base_copies"] == 1


def test_the_rewards_benchmark_on_a_tiny_model(tiny_model, tmp_path):
    flags = sum((["--set", f"{key.lstrip('-')}={value}"] for key, value in zip(*[iter(tiny_flags(tiny_model)[2:])] * 2)),
                [])
    out = tmp_path / "rewards.json"
    run([PYTHON, "benchmarks/rewards.py", "--objectives", "ppo", "--seeds", "0", "--base", tiny_model,
         "--output_dir", str(tmp_path / "runs"), "--memory_iterations", "1", "--json", str(out), *flags])
    results = json.loads(out.read_text())
    row = results["runs"]["ppo"][0]
    assert results["min_accuracy_gain"] == pytest.approx(row["accuracy_gain"])
    assert row["reward_seconds_per_iteration"] > 0
    memory = results["memory"]
    assert memory["reward_function"]["base_copies"] == memory["reward_head"]["base_copies"] == 1
    extra = memory["reward_model_extra"]
    assert extra["measured_bytes"] > 0 and abs(extra["estimate_error"]) < 0.05  # one more copy, as estimated


def test_the_example_reward_file_resolves_and_scores():
    from hydra_rlhf.rewards import call_reward_function, resolve_reward_function

    brevity = resolve_reward_function("recipes/example_rewards.py:brevity")
    values = call_reward_function(brevity, ["q"] * 3, ["a", "b", "c"], [[1] * 10, [1] * 36, [1] * 60], {})
    assert values == [1.0, 0.5, 0.0]
