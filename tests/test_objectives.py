"""The objective axis: each objective's math against numbers worked out by hand, critic-free layouts, gradient
accumulation, and every objective end to end through the recipe (tiny model)."""

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CLI, PYTHON, run
from hydra_rlhf.objectives import functional as ppo_math
from hydra_rlhf.config import RLConfig
from hydra_rlhf.model.heads import HEADS_FILE
from hydra_rlhf.layout import MODES, OBJECTIVES, counts, role_plan
from hydra_rlhf.objectives.base import group_stats
from hydra_rlhf.objectives.grpo import group_normalized_advantages, k3_kl
from hydra_rlhf.objectives.online_dpo import best_and_worst, dpo_loss, sequence_logratios
from hydra_rlhf.objectives.rloo import rloo_advantages

CRITIC_FREE = [name for name, info in OBJECTIVES.items() if not info.critic]

# ------------------------------------------------------------------------------------------------ the math


def test_rloo_leave_one_out_baseline_with_the_kl_penalty():
    # rewards = scores - 0.5 * kl = [1, 2 - 1, 3, 6] = [1, 1, 3, 6]; groups of 2: each baseline is the other
    # sample's reward -> A = [1 - 1, 1 - 1, 3 - 6, 6 - 3] = [0, 0, -3, 3]
    advantages, rewards = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 2.0, 0.0, 0.0]),
                                          group_size=2, kl_coef=0.5)
    assert rewards.tolist() == [1.0, 1.0, 3.0, 6.0]
    assert advantages.tolist() == [0.0, 0.0, -3.0, 3.0]
    # k = 3, rewards [0, 3, 6]: baselines (3+6)/2, (0+6)/2, (0+3)/2 = [4.5, 3, 1.5] -> A = [-4.5, 0, 4.5]
    advantages, _ = rloo_advantages(torch.tensor([0.0, 3.0, 6.0]), torch.zeros(3), group_size=3, kl_coef=0.1)
    assert torch.allclose(advantages, torch.tensor([-4.5, 0.0, 4.5]))


def test_grpo_group_normalised_advantages():
    # group [1, 3]: mean 2, std (Bessel) sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2) -> A = -+1 / (1.41421 + 1e-4)
    # group [5, 5]: no spread -> 0
    advantages = group_normalized_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    expected = 1 / (math.sqrt(2) + 1e-4)
    assert advantages.tolist() == pytest.approx([-expected, expected, 0.0, 0.0], abs=1e-6)


def test_grpo_scale_rewards_none_and_batch():
    # Scores [0, 0.1 | 0, 1]: one group differs only in a small term (0.1), the other in a right answer (1).
    scores = torch.tensor([0.0, 0.1, 0.0, 1.0])
    # group: both groups get the same full-size advantages, whatever the size of their difference
    group = group_normalized_advantages(scores, group_size=2, scale="group")
    assert float(group[1]) == pytest.approx(float(group[3]), abs=1e-3)
    # none (Dr. GRPO): centred only -> [-0.05, 0.05, -0.5, 0.5]; the small term stays small
    none = group_normalized_advantages(scores, group_size=2, scale="none")
    assert none.tolist() == pytest.approx([-0.05, 0.05, -0.5, 0.5], abs=1e-6)
    # batch: centred per group, divided by the batch's std (Bessel): std([0, .1, 0, 1]) = 0.48563
    batch = group_normalized_advantages(scores, group_size=2, scale="batch")
    assert batch.tolist() == pytest.approx([v / (0.485627 + 1e-4) for v in (-0.05, 0.05, -0.5, 0.5)], abs=1e-5)


@pytest.mark.parametrize("scale, expected", [("group", 0.7070), ("none", 0.05)])
def test_grpo_reads_scale_rewards_from_the_config(scale, expected):
    from types import SimpleNamespace

    from hydra_rlhf.layout import objective_info
    from hydra_rlhf.objectives.functional import RunningMoments
    from hydra_rlhf.objectives.grpo import GRPO

    config = RLConfig(objective="grpo", num_samples_per_prompt=2, batch_size=1, minibatch_size=2, scale_rewards=scale)
    rollout = SimpleNamespace(raw_scores=torch.tensor([0.0, 0.1]), has_eos=torch.ones(2, dtype=torch.bool),
                              group_size=2, response_mask=torch.ones(2, 3))
    targets = GRPO(config, objective_info("grpo")).targets(rollout, 0.05, RunningMoments())
    assert targets.batch.advantages[:, 0].tolist() == pytest.approx([-expected, expected], abs=1e-3)


def test_k3_kl_by_hand():
    # pi = 0.5, pi_ref = 0.25: d = log(0.25 / 0.5) = -0.693147; exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    value = k3_kl(torch.tensor([math.log(0.5), math.log(0.3)]), torch.tensor([math.log(0.25), math.log(0.3)]))
    assert value.tolist() == pytest.approx([0.193147, 0.0], abs=1e-6)


def test_online_dpo_pairs_and_loss_by_hand():
    # groups of 2: [0.2, 0.9] -> chosen row 1, rejected row 0; [0.5, 0.1] -> chosen 2, rejected 3
    chosen, rejected = best_and_worst(torch.tensor([0.2, 0.9, 0.5, 0.1]), group_size=2)
    assert chosen.tolist() == [1, 2] and rejected.tolist() == [0, 3]
    # one group of 4: the best (0.9, row 1) against the worst (0.1, row 3)
    chosen, rejected = best_and_worst(torch.tensor([0.2, 0.9, 0.5, 0.1]), group_size=4)
    assert chosen.tolist() == [1] and rejected.tolist() == [3]
    # beta 0.5, log-ratios +1 (chosen) and -1 (rejected): -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.313262;
    # equal log-ratios: -log sigmoid(0) = log 2
    losses = dpo_loss(torch.tensor([1.0, 0.3]), torch.tensor([-1.0, 0.3]), beta=0.5)
    assert losses.tolist() == pytest.approx([0.313262, math.log(2)], abs=1e-6)
    # the sequence log-ratio sums real tokens only: (-1 - -2) + (-1 - -1) = 1, padding ignored
    ratio = sequence_logratios(torch.tensor([[-1.0, -1.0, -5.0]]), torch.tensor([[-2.0, -1.0, 0.0]]),
                               torch.tensor([[1.0, 1.0, 0.0]]))
    assert ratio.tolist() == [1.0]


def test_group_statistics_by_hand():
    # groups [1, 3] (population std 1) and [2, 2] (0): mean std 0.5, half of the groups have no spread
    stats = group_stats(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2)
    assert stats == {"group/reward_std": 0.5, "group/zero_spread_fraction": 0.5}
    assert group_stats(torch.tensor([1.0, 2.0]), group_size=1) == {}


def test_token_mean_over_a_whole_minibatch():
    # rows [1, 2, 3] and [4, pad, pad] with the minibatch's 8 real tokens as the normaliser: (6 + 4) / 8
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ppo_math.token_mean(x, mask, normalizer=8).item() == pytest.approx(1.25)
    assert ppo_math.token_mean(x, mask).item() == pytest.approx(2.5)  # its own 4 tokens


# ------------------------------------------------------------------------------------------------ layout


def test_layout_counts_per_mode_and_objective():
    expected = {  # base copies, adapters, full copies, graphs with grad, value heads
        ("full", True): (4, 0, 2, 2, 1), ("full", False): (3, 0, 1, 1, 0),
        ("lora", True): (2, 2, 0, 2, 1), ("lora", False): (2, 1, 0, 1, 0),
        ("j-hydra", True): (1, 1, 0, 1, 1), ("j-hydra", False): (1, 1, 0, 1, 0),
        ("hydra", True): (1, 2, 0, 2, 1), ("hydra", False): (1, 1, 0, 1, 0),
    }
    for (mode, critic), numbers in expected.items():
        found = counts(role_plan(mode, critic))
        assert tuple(found[k] for k in ("base_copies", "adapters", "full_copies", "train_graphs", "value_heads")) \
            == numbers, (mode, critic)


def test_config_checks_per_objective():
    assert RLConfig(objective="grpo").samples_per_prompt == 4 and RLConfig().samples_per_prompt == 1
    assert RLConfig(objective="online_dpo", batch_size=8, num_samples_per_prompt=4).train_rows == 16  # one pair each
    with pytest.raises(ValueError, match="objective rloo compares samples of the same prompt"):
        RLConfig(objective="rloo", num_samples_per_prompt=1)
    with pytest.raises(ValueError, match="Unknown objective 'ppo2': use one of ppo, rloo, grpo, online_dpo"):
        RLConfig(objective="ppo2")
    with pytest.raises(ValueError, match="keeps each chosen/rejected pair together"):
        RLConfig(objective="online_dpo", batch_size=4, minibatch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="the 64 sequences an iteration trains on"):
        RLConfig(objective="grpo", batch_size=16, minibatch_size=48)
    with pytest.raises(ValueError, match="dpo_beta must be > 0"):
        RLConfig(objective="online_dpo", dpo_beta=0)
    with pytest.raises(ValueError, match="scale_rewards"):
        RLConfig(objective="grpo", scale_rewards="std")


# ------------------------------------------------------------------------------------------------ on a model


def make_trainer(tiny_model, tokenizer, tmp_path, objective="ppo", mode="hydra", **overrides):
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    settings = dict(objective=objective, prompts_path="unused", batch_size=4, minibatch_size=4, max_new_tokens=6,
                    max_iterations=3, save_every=0, save_final=False, output_dir=str(tmp_path), seed=3,
                    num_samples_per_prompt=2 if objective != "ppo" else 1)
    settings.update(overrides)
    config = RLConfig(**settings)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, mode=mode, lora_r=4), seed=3,
                                   critic=OBJECTIVES[objective].critic)
    prompts = [[{"role": "user", "content": f"Give me a tip about topic {i}."}] for i in range(16)]
    return RLTrainer(model, tokenizer, config, prompts)


@pytest.mark.parametrize("mode", MODES)
def test_critic_free_means_critic_free(tiny_model, tokenizer, tmp_path, mode):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective="grpo", mode=mode)
    model = trainer.model
    try:
        assert model.value_head is None and not model.has_critic
        assert all("critic" not in getattr(base, "peft_config", {}) for base in model.bases.values())
        assert "critic" not in model.bases  # full mode: no critic copy
        assert list(model.parameter_groups()) == ["actor"] and trainer.group_names == ["actor"]
        with pytest.raises(ValueError, match="Role 'critic' is not in this model"):
            with model.role("critic"):
                pass
        # one forward per scoring stage and per micro-batch: no value pass anywhere
        forwards = defaultdict(int)
        original = model._hidden

        def counting(*args, **kwargs):
            forwards[trainer.profiler_stage] += 1
            return original(*args, **kwargs)

        model._hidden = counting
        stage = trainer.profiler.stage

        def named_stage(name):
            trainer.profiler_stage = name
            return stage(name)

        trainer.profiler.stage = named_stage
        metrics = trainer.step()
        separate_reward_model = mode in ("lora", "full")  # their reference and reward model are two bases
        assert forwards == {"score_frozen": 1 + separate_reward_model, "score_policy": 1, "train": 2 * 2}  # 2 epochs x 2
        # optimizer state exists for the actor's parameters only
        state_params = {id(p) for p in trainer.optimizer.state}
        assert state_params == {id(p) for p in model.parameter_groups()["actor"]}
        assert "lr/critic" not in metrics and "value/loss" not in metrics
    finally:
        trainer.profiler.close()
    trainer.save_checkpoint()
    saved = next((tmp_path / "checkpoints").iterdir())
    from safetensors import safe_open

    with safe_open(str(saved / HEADS_FILE), framework="pt") as heads:
        assert sorted(heads.keys()) == ["reward_head.bias", "reward_head.weight"]


def test_a_ppo_step_uses_the_critic(tiny_model, tokenizer, tmp_path):
    # the contrast that makes the test above meaningful: PPO runs a value forward in scoring and in training
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective="ppo")
    calls = []
    original = trainer.model._values
    trainer.model._values = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        metrics = trainer.step()
    finally:
        trainer.profiler.close()
    assert len(calls) == 1 + 2  # score_policy, and one train minibatch in each of 2 epochs
    assert "value/loss" in metrics and "lr/critic" in metrics


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_every_trainable_parameter(tiny_model, tokenizer, tmp_path, objective):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective=objective, minibatch_size=2 if objective == "ppo" else 4)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fingerprint = model.frozen_fingerprint()
    try:
        metrics = trainer.step()
    finally:
        trainer.profiler.close()
    assert before and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert model.frozen_fingerprint() == fingerprint  # the reference and the reward never move
    assert metrics["train/skipped_nonfinite_updates"] == 0
    assert metrics["response/count"] == 4 * trainer.config.samples_per_prompt
    if objective != "ppo":  # group statistics of the k samples per prompt
        assert 0 <= metrics["group/zero_spread_fraction"] <= 1 and metrics["group/reward_std"] > 0
    if objective == "online_dpo":
        assert metrics["dpo/score_margin"] > 0 and 0 <= metrics["dpo/implicit_accuracy"] <= 1


def test_k_samples_of_a_prompt_come_from_one_generate_call(tiny_model, tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective="rloo", num_samples_per_prompt=3,
                           batch_size=2, minibatch_size=6)
    calls = []
    original = trainer.model.generate
    trainer.model.generate = lambda ids, mask, **kw: calls.append(ids.clone()) or original(ids, mask, **kw)
    try:
        trainer.step()
    finally:
        trainer.profiler.close()
    (ids,) = calls
    assert ids.shape[0] == 6 and torch.equal(ids[0], ids[2]) and torch.equal(ids[3], ids[5])
    assert not torch.equal(ids[0], ids[3])  # adjacent rows are one prompt's group


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_gradient_accumulation_weights_tokens_like_one_pass(tiny_model, tokenizer, tmp_path, objective):
    from hydra_rlhf.experience import stages as experience

    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective=objective)
    trainer.profiler.close()
    model, config = trainer.model, trainer.config
    torch.manual_seed(0)
    ids, mask = trainer.experience.prompts(0)
    rollout = experience.generate(model, ids, mask, trainer.experience.generation_kwargs, trainer.eos_token_ids,
                                  samples_per_prompt=config.samples_per_prompt)
    # responses of unequal length: rows end after 1, 6, 2 and 6 ... tokens
    lengths = torch.tensor([1, 6, 2, 6, 3, 6, 1, 5])[: len(rollout.input_ids)]
    rollout.response_mask = (torch.arange(rollout.responses.shape[1])[None] < lengths[:, None]).long()
    rollout.attention_mask = torch.cat([rollout.attention_mask[:, : rollout.prompt_len], rollout.response_mask], 1)
    experience.score_frozen(model, rollout, 1.0, tokenizer.eos_token_id)
    experience.score_policy(model, rollout, 1.0)
    targets = trainer.objective.targets(rollout, 0.1, ppo_math.RunningMoments())
    batch = targets.batch
    rows = torch.arange(len(batch.input_ids))
    normalizer = trainer.objective.normalizer(batch.response_mask)

    def gradients(parts, scale_each_by_its_own_mean=False):
        model.zero_grad(set_to_none=True)
        for part in parts:
            part_norm = trainer.objective.normalizer(batch.response_mask[part]) if scale_each_by_its_own_mean else normalizer
            loss = trainer.objective.loss(model, targets.select(part), part_norm, defaultdict(list))
            (loss / len(parts) if scale_each_by_its_own_mean else loss).backward()
        return torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None])

    model.train()
    unit = trainer.objective.info.rows_per_unit
    one_pass = gradients([rows])
    accumulated = gradients(list(rows.split(2 * unit)))
    assert torch.allclose(one_pass, accumulated, atol=1e-6, rtol=1e-4)
    if objective != "online_dpo":  # pairs have equal weight anyway; tokens did not, before the fix
        old_way = gradients(list(rows.split(2 * unit)), scale_each_by_its_own_mean=True)
        assert not torch.allclose(one_pass, old_way, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ recipes


def write_config(path: Path, tiny_model: str, prompts_file: Path, output_dir: Path, **overrides) -> Path:
    config = {"model_name_or_path": tiny_model, "mode": "hydra", "prompts_path": str(prompts_file),
              "eval_prompts_path": str(prompts_file), "num_eval_prompts": 6, "batch_size": 4, "minibatch_size": 4,
              "max_new_tokens": 6, "max_iterations": 2, "save_every": 1, "output_dir": str(output_dir), "lora_r": 4,
              "seed": 2, **overrides}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("objective", CRITIC_FREE)
def test_recipe_runs_every_critic_free_objective(tiny_model, prompts_file, tmp_path, objective):
    output = tmp_path / objective
    config = write_config(tmp_path / "c.yaml", tiny_model, prompts_file, output)
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--objective", objective, "--num_samples_per_prompt", "2"])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["objective"] == objective and summary["base_copies"] == 1 and summary["frozen_base_unchanged"]
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["response/count"] for m in metrics] == [8, 8]
    assert "group/zero_spread_fraction" in metrics[0] and "value/loss" not in metrics[0]
    final = output / "final"
    assert (final / "shared" / "actor").is_dir() and not (final / "shared" / "critic").exists()
    if objective == "grpo":  # the saved critic-free run reloads and reproduces its own evaluation
        evaluated = run([CLI, "evaluate", str(output / "checkpoints" / "iter-000002"),
                         "--prompts", str(prompts_file), "--num-prompts", "6", "--max-new-tokens", "6", "--json",
                         str(tmp_path / "e.json")])
        assert "iter-000002" in evaluated.stdout
        (result,) = json.loads((tmp_path / "e.json").read_text()).values()
        assert result["gold_after"] == pytest.approx(summary["eval"]["gold_after"], abs=1e-6)
        assert result["kl_to_reference"] == pytest.approx(summary["eval"]["kl_to_reference"], abs=1e-5)


def test_objectives_benchmark_on_a_tiny_model(tiny_model, prompts_file, pairs_files, tmp_path):
    out = tmp_path / "objectives.json"
    shared = ["--set", "lora_r=4", "--set", "lora_layers=1", "--set", "max_iterations=1", "--set", "max_new_tokens=4", "--set",
              "num_eval_prompts=4", "--set", "save_every=0", "--set", f"prompts_path={prompts_file}",
              "--set", f"eval_prompts_path={prompts_file}"]
    result = run([PYTHON, "benchmarks/objectives.py", "--objectives", "ppo,grpo", "--sft", str(tmp_path / "sft"),
                  "--output_dir", str(tmp_path), "--json", str(out),
                  "--sft_set", f"model_name_or_path={tiny_model}", "--sft_set", "lora_r=4", "--sft_set", "lora_layers=1",
                  "--sft_set", f"train_path={pairs_files[0]}", "--sft_set", f"eval_path={pairs_files[1]}",
                  "--sft_set", "max_train_pairs=16", *shared])
    assert "Objectives at an equal budget" in result.stdout
    data = json.loads(out.read_text())["objectives"]
    assert data["ppo"]["responses_generated"] == data["grpo"]["responses_generated"] == 16  # the configs' budget
    assert data["ppo"]["critic"] and not data["grpo"]["critic"]
    # the critic's adapter, value head, their AdamW states and its forward are gone from the train stage
    assert data["grpo"]["train_peak_minus_ppo_bytes"] < 0
    for row in data.values():
        assert set(row["stages"]) == {"generate", "score_frozen", "score_policy", "advantages", "train", "log"}
        assert row["meets_targets"] == (row["gold_gain"] >= 0.3 and row["win_rate_vs_sft"] >= 0.7
                                        and row["distinct2_ratio"] >= 0.7)
