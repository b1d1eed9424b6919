"""The PPO recipe end to end on a tiny model: outputs, resume after SIGKILL, multi-process, NaN guard."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CLI, LAUNCHERS, PYTHON, ROOT, run


def write_config(path: Path, tiny_model: str, prompts_file: Path, output_dir: Path, **overrides) -> Path:
    config = {
        "model_name_or_path": tiny_model, "mode": "hydra", "prompts_path": str(prompts_file),
        "eval_prompts_path": str(prompts_file), "num_eval_prompts": 8, "batch_size": 4, "minibatch_size": 2,
        "max_new_tokens": 8, "max_iterations": 2, "save_every": 1, "output_dir": str(output_dir),
        "lora_r": 4, "seed": 1,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((run_dir / "final").rglob("*.safetensors")):
        tensors.update({f"{file.relative_to(run_dir)}:{k}": v for k, v in load_file(file).items()})
    return tensors


def test_ppo_recipe_writes_everything(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "run"
    config = write_config(tmp_path / "ppo.yaml", tiny_model, prompts_file, output)
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config), "--kl_coef", "0.1"])
    assert "overall peak" in result.stdout
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in ("objective/kl", "objective/reward", "policy/clipfrac", "policy/approx_kl", "value/loss",
                "value/explained_variance", "response/length_mean", "speed/tokens_per_second",
                "memory/train_peak_bytes", "objective/kl_coef"):
        assert key in metrics[0], key
    assert metrics[0]["objective/kl_coef"] == 0.1  # the flag overrode nothing else but won over the default
    memory = [json.loads(line) for line in (output / "memory.jsonl").read_text().splitlines()]
    assert set(memory[0]["stages"]) == {"generate", "score_frozen", "score_policy", "advantages", "train", "log"}
    assert all(s["peak_bytes"] > 0 for s in memory[0]["stages"].values())
    summary = json.loads((output / "summary.json").read_text())
    assert summary["base_copies"] == 1 and summary["frozen_base_unchanged"]
    for key in ("gold_before", "gold_after", "win_rate_vs_sft", "distinct2_before", "distinct2_after", "kl_to_reference"):
        assert key in summary["eval"], key
    assert (output / "training.png").stat().st_size > 0 and (output / "memory.png").stat().st_size > 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["iter-000001", "iter-000002"]
    # `hydra-rlhf report` reads the same log back
    report = run([CLI, "report", str(output), "--json", str(tmp_path / "r.json")])
    assert "overall peak" in report.stdout
    assert json.loads((tmp_path / "r.json").read_text())["iterations"] == 2
    # `hydra-rlhf evaluate` reloads each checkpoint; the last one reproduces the run's own evaluation
    evaluated = run([CLI, "evaluate", str(output), "--prompts", str(prompts_file),
                     "--num-prompts", "8", "--max-new-tokens", "8", "--json", str(tmp_path / "e.json")])
    assert "iter-000001" in evaluated.stdout and "iter-000002" in evaluated.stdout
    per_checkpoint = json.loads((tmp_path / "e.json").read_text())
    assert [Path(p).name for p in per_checkpoint] == ["iter-000001", "iter-000002"]
    last = per_checkpoint[str(output / "checkpoints" / "iter-000002")]
    for key in ("gold_before", "gold_after", "win_rate_vs_sft", "distinct2_after", "kl_to_reference", "reward_head_after"):
        assert last[key] == pytest.approx(summary["eval"][key], abs=1e-5), key


def test_resume_after_sigkill_is_bit_identical(tiny_model, prompts_file, tmp_path):
    settings = dict(max_iterations=4, eval_prompts_path="", kl_controller="adaptive", reward_normalization="running")
    straight = tmp_path / "straight"
    run([PYTHON, "recipes/ppo.py", "--config",
         str(write_config(tmp_path / "a.yaml", tiny_model, prompts_file, straight, **settings))])

    killed = tmp_path / "killed"
    config = write_config(tmp_path / "b.yaml", tiny_model, prompts_file, killed, **settings)
    process = subprocess.Popen([PYTHON, "recipes/ppo.py", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "iter-000002").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "checkpoints" / "iter-000004").exists()
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true"])

    a, b = adapter_tensors(straight), adapter_tensors(killed)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


def kl_history(run_dir: Path) -> list[float]:
    return [json.loads(line)["objective/kl"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_at_kl_ends_the_run_where_the_kl_budget_is_spent(tiny_model, prompts_file, tmp_path):
    settings = dict(eval_prompts_path="", save_every=0, actor_lr=3e-3)
    fixed = tmp_path / "fixed"
    run([PYTHON, "recipes/ppo.py", "--config",
         str(write_config(tmp_path / "a.yaml", tiny_model, prompts_file, fixed, max_iterations=4, **settings))])
    kls = kl_history(fixed)
    window_means = {i: (kls[i - 2] + kls[i - 1]) / 2 for i in (2, 3, 4)}  # the default window: 2 iterations
    budget = max(window_means[2], window_means[3]) * (1 - 1e-6)
    expected = min(i for i, mean in window_means.items() if mean >= budget)
    assert expected < 4 and budget > 0

    stopped = tmp_path / "stopped"
    config = write_config(tmp_path / "b.yaml", tiny_model, prompts_file, stopped, max_iterations=6,
                          stop_at_kl=budget, **settings)
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config)])
    assert "reached stop_at_kl" in result.stderr
    assert kl_history(stopped) == kls[:expected]  # the same run as the fixed one, up to the stop
    assert json.loads((stopped / "summary.json").read_text())["iterations"] == expected
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [f"iter-{expected:06d}"]  # saved at the stop
    # a finished run stays finished: resuming it trains nothing more; with a raised budget it goes on to the cap
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true"])
    assert len(kl_history(stopped)) == expected
    assert json.loads((stopped / "summary.json").read_text())["iterations"] == expected
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true", "--stop_at_kl", str(budget * 1e6)])
    assert json.loads((stopped / "summary.json").read_text())["iterations"] == 6


def test_two_processes_keep_identical_adapters(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "ddp"
    config = write_config(tmp_path / "ddp.yaml", tiny_model, prompts_file, output, eval_prompts_path="")
    run([*LAUNCHERS["two"], "recipes/ppo.py", "--config", str(config)],
        env={"OMP_NUM_THREADS": "1"})
    summary = json.loads((output / "summary.json").read_text())
    hashes = summary["trainable_hash_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # FSDP2 replicas: it averaged the gradients, not the trainer
    assert (summary["sharding"], summary["processes"]) == ("none", 2)
    # ... and they trained: peft starts every lora_B at zero, so a trained adapter has none left at zero
    trained = adapter_tensors(output)
    lora_b = {k: v for k, v in trained.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())
    assert summary["iterations"] == 2 and summary["final_metrics"]["train/skipped_nonfinite_updates"] == 0


def test_nonfinite_rewards_skip_updates_then_stop(tiny_model, tokenizer, prompts_file, tmp_path):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.checkpoints import latest_intact_checkpoint as latest_checkpoint
    from hydra_rlhf.trainer import NonFiniteError, RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4))
    config = RLConfig(prompts_path=str(prompts_file), batch_size=4, minibatch_size=4, max_new_tokens=4,
                       max_iterations=10, save_every=1, output_dir=str(tmp_path), max_nonfinite_in_a_row=2)
    trainer = RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])
    try:
        trainer.step()
        assert latest_checkpoint(tmp_path).name == "iter-000001"
        with torch.no_grad():
            model.reward_head.bias.fill_(float("nan"))
        after_good = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        metrics = trainer.step()
        assert metrics["train/skipped_nonfinite_updates"] == 1
        with pytest.raises(NonFiniteError, match=r"2 iterations in a row.*the last: non-finite rewards \(4 of 4 "):
            trainer.step()
    finally:
        trainer.profiler.close()
    assert all(torch.equal(p, after_good[n]) for n, p in model.named_parameters() if n in after_good)
    assert latest_checkpoint(tmp_path).name == "iter-000001"  # no checkpoint of a bad iteration


def test_nonfinite_problem_names_rewards_or_gradients():
    from hydra_rlhf.trainer import nonfinite_problem

    scores = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    assert nonfinite_problem(scores, False, {}).startswith("non-finite rewards (2 of 4 rewards here")
    assert "on another rank" in nonfinite_problem(torch.zeros(4), False, {})
    assert nonfinite_problem(torch.zeros(4), True, {"train/skipped_nonfinite_updates": 2.0}) == (
        "a non-finite gradient norm in 2 updates")
    assert nonfinite_problem(torch.zeros(4), True, {"train/skipped_nonfinite_updates": 0.0}) is None


def test_recipe_rejects_unknown_yaml_key(tiny_model, prompts_file, tmp_path):
    config = write_config(tmp_path / "bad.yaml", tiny_model, prompts_file, tmp_path / "x", kl_coeff=0.1)
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config)], check=False)
    assert result.returncode == 2
    assert "kl_coeff" in result.stderr and "Traceback" not in result.stderr


def test_fresh_run_refuses_an_existing_run_dir(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "old"
    output.mkdir()
    (output / "metrics.jsonl").write_text("{}\n")
    config = write_config(tmp_path / "c.yaml", tiny_model, prompts_file, output)
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config)], check=False)
    assert result.returncode == 2 and "already holds a run: pass --resume true" in result.stderr


def test_left_pad_to_the_longest_or_to_a_fixed_length():
    from hydra_rlhf.data import left_pad

    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad_id=0, length=5)
    assert ids.tolist() == [[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]


def test_prompts_padded_to_max_length_give_fixed_shapes(tiny_model, tokenizer, prompts_file, tmp_path):
    # What `hydra-rlhf profile` relies on: every rollout is exactly max_prompt_length + max_new_tokens wide.
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4))
    config = RLConfig(prompts_path=str(prompts_file), batch_size=2, minibatch_size=2, max_new_tokens=3,
                       stop_at_eos=False, max_prompt_length=80, pad_prompts_to_max_length=True, output_dir=str(tmp_path))
    trainer = RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])
    try:
        ids, mask = trainer.experience.prompts(0)
    finally:
        trainer.profiler.close()
    assert ids.shape == (2, 80) and 0 < mask.sum(1).max() < 80


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "recipes" / "configs").glob("*_smollm2.yaml")
                                          if not p.name.startswith("sft")))
def test_every_shipped_rl_config_runs(tiny_model, prompts_file, tmp_path, config):
    # The YAML a user launches (its header's command), on a tiny model for one short iteration: the keys parse,
    # the objective's batch arithmetic holds, and the run ends with the objective the file names.
    output = tmp_path / "run"
    run([PYTHON, "recipes/ppo.py", "--config", f"recipes/configs/{config}", "--model_name_or_path", tiny_model,
         "--lora_layers", "1", "--prompts_path", str(prompts_file), "--eval_prompts_path", "", "--max_iterations", "1",
         "--max_new_tokens", "4", "--save_every", "0", "--output_dir", str(output)])
    summary = json.loads((output / "summary.json").read_text())
    assert summary["objective"] == yaml.safe_load((ROOT / "recipes" / "configs" / config).read_text())["objective"]
    assert summary["final_metrics"]["response/count"] == 16  # every shipped config: 16 responses per iteration


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_stop_at_eos_decides_where_a_response_ends(tiny_model, tokenizer, prompts_file, tmp_path, stop_at_eos):
    # An EOS logit boosted so that EOS is sampled early in most rows. With stop_at_eos a response ends at its first
    # EOS; without it no token ends a response: it runs to the cap and every token counts (as the vLLM engine
    # gives it, which is told of no EOS then).
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4))
    eos = tokenizer.eos_token_id

    def boost_eos(module, inputs, logits):
        logits[..., eos] += 12.0  # e^12 against ~49k uniform-ish logits: EOS ~75% a step
        return logits

    for base in model.bases.values():
        base.get_output_embeddings().register_forward_hook(boost_eos)
    config = RLConfig(prompts_path=str(prompts_file), batch_size=4, minibatch_size=4, max_new_tokens=6,
                       stop_at_eos=stop_at_eos, output_dir=str(tmp_path))
    trainer = RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])
    try:
        rollout, _ = trainer.experience.make(trainer.model, 0)
    finally:
        trainer.profiler.close()
    responses = rollout.input_ids[:, rollout.prompt_len:]
    sampled_eos = responses == eos
    if stop_at_eos:
        assert rollout.has_eos.all()
        first = sampled_eos.long().argmax(1)
        assert rollout.response_mask.sum(1).tolist() == (first + 1).tolist()
    else:
        assert sampled_eos[:, :-1].any(), "the boosted EOS should be sampled before the cap"
        assert responses.shape[1] == 6 and not rollout.has_eos.any()
        assert rollout.response_mask.bool().all()


@pytest.mark.parametrize("mode", ["hydra", "j-hydra"])
def test_critic_warmup_trains_the_critic_alone_first(tiny_model, tokenizer, prompts_file, tmp_path, mode):
    from hydra_rlhf.config import HydraModelConfig, RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4, mode=mode))
    config = RLConfig(prompts_path=str(prompts_file), batch_size=4, minibatch_size=2, max_new_tokens=6,
                      max_iterations=3, critic_warmup=2, save_every=0, save_final=False, output_dir=str(tmp_path),
                      actor_lr=1e-2, critic_lr=1e-2)
    trainer = RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])
    groups = model.parameter_groups()
    snapshot = lambda name: [p.detach().clone() for p in groups[name]]  # noqa: E731
    moved = lambda name, before: [not torch.equal(p, b) for p, b in zip(groups[name], before)]  # noqa: E731
    try:
        actor, critic = snapshot("actor"), snapshot("critic")
        warmups = [trainer.step(), trainer.step()]
        assert not any(moved("actor", actor))  # j-hydra: the shared adapter is the actor's, so only the head learns
        assert all(moved("critic", critic))  # value head, and in hydra the critic adapter (lora_A and lora_B)
        assert all("value/loss" in m and "policy/loss" not in m and abs(m["objective/kl"]) < 1e-4 for m in warmups)
        metrics = trainer.step()
        assert "policy/loss" in metrics and all(moved("actor", actor))
    finally:
        trainer.profiler.close()


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "rloo", "critic_warmup": 1}, "critic_warmup needs a critic: objective rloo has none"),
    ({"critic_warmup": 4, "max_iterations": 4}, "critic_warmup 4 leaves the actor no iteration"),
    ({"critic_warmup": -1}, "critic_warmup must be >= 0"),
])
def test_critic_warmup_refuses_in_one_line(overrides, message):
    from hydra_rlhf.config import RLConfig

    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)
