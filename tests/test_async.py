"""Asynchronous off-policy training (``async_generation``): the schedule, off-policy correctness, one base shared
between learner and generator, the two-process layout, and faults."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from conftest import LAUNCHERS, PYTHON, ROOT, run
from hydra_rlhf.experience import asynchronous
from hydra_rlhf.experience.maker import ExperienceMaker
from test_faults import ppo_config


def make_trainer(tiny_model, tokenizer, tmp_path, objective="ppo", **overrides):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.layout import objective_info
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4),
                                   critic=objective_info(objective).critic)
    settings = {"objective": objective, "batch_size": 4, "minibatch_size": 4, "max_new_tokens": 6,
                "max_iterations": 4, "save_every": 0, "output_dir": str(tmp_path / "run"), "seed": 3,
                "actor_lr": 1e-3, **overrides}
    prompts = [[{"role": "user", "content": f"Give me tip number {i}."}] for i in range(24)]
    return RLTrainer(model, tokenizer, RLConfig(**settings), prompts)


def train(trainer) -> list[dict]:
    try:
        return trainer.train()
    finally:
        trainer.profiler.close()


COMPARED = ("objective/reward", "objective/kl", "train/grad_norm", "response/length_mean")


def test_the_schedule_bounds_staleness():
    assert [asynchronous.policy_version_for(i, 1) for i in range(5)] == [0, 0, 1, 2, 3]
    assert [asynchronous.policy_version_for(i, 2) for i in range(5)] == [0, 0, 0, 1, 2]
    assert [asynchronous.policy_version_for(i, 0) for i in range(3)] == [0, 1, 2]  # synchronous
    assert [asynchronous.policy_version_for(i, 1, start=3) for i in range(3, 6)] == [3, 3, 4]  # after a resume


def test_stale_groups_are_dropped_whole_and_counted():
    from hydra_rlhf.experience.rollout import Rollout

    rows = 6  # 3 prompts x k=2
    rollout = Rollout(input_ids=torch.arange(rows)[:, None], attention_mask=torch.ones(rows, 1, dtype=torch.long),
                      response_mask=torch.ones(rows, 1, dtype=torch.long), has_eos=torch.ones(rows, dtype=torch.bool),
                      prompt_len=0, group_size=2, policy_version=torch.tensor([5, 5, 3, 5, 4, 4]))
    kept, dropped = rollout.drop_stale(learner_version=5, max_staleness=1)
    assert dropped == 2 and kept.input_ids.flatten().tolist() == [0, 1, 4, 5]  # the group with a version-3 sample
    kept, dropped = rollout.drop_stale(learner_version=5, max_staleness=2)
    assert dropped == 0 and kept is rollout
    kept, dropped = rollout.drop_stale(learner_version=9, max_staleness=1)
    assert kept is None and dropped == 6


class ListChannel:
    """The generator's side of a channel, in this process: adapters from a list, batches into a list."""

    def __init__(self, adapters):
        self.adapters, self.batches = list(adapters), []

    def receive_adapter(self):
        return self.adapters.pop(0)

    def send_batch(self, batch):
        self.batches.append(batch)


def test_the_generator_records_the_behaviour_policy_of_each_batch(tiny_model, tokenizer, tmp_path):
    # Off-policy correctness: a batch's log-probs (pi_old of every ratio) are those of the actor version that
    # sampled it, and that version is the scheduled one, not the newest.
    from hydra_rlhf.experience.stages import score_policy

    trainer = make_trainer(tiny_model, tokenizer, tmp_path, objective="rloo", max_staleness=1)
    trainer.profiler.close()
    model, actor = trainer.model, asynchronous.actor_parameters(trainer.model)
    version_0 = asynchronous.adapter_vector(model)
    version_1 = version_0 + 0.05 * torch.randn_like(version_0)
    channel = ListChannel([(1, version_1)])
    asynchronous.generate_batches(model, trainer.experience, channel, start=0, end=3, max_staleness=1)
    assert [b.version for b in channel.batches] == [0, 0, 1] and not channel.adapters
    for batch in channel.batches:
        assert batch.rollout.policy_version.tolist() == [batch.version] * len(batch.rollout.input_ids)
        assert batch.rollout.values is None  # the learner's critic gives the values, never the generator's copy
        recorded = batch.rollout.logprobs
        for version, vector in ((0, version_0), (1, version_1)):
            torch.nn.utils.vector_to_parameters(vector.clone(), actor)
            score_policy(model, batch.rollout, 1.0, values=False)
            same = torch.allclose(batch.rollout.logprobs, recorded, atol=1e-6)
            assert same == (version == batch.version)
        batch.rollout.logprobs = recorded


@pytest.mark.parametrize("objective", ["ppo", "rloo", "online_dpo"])
def test_async_at_staleness_0_is_the_synchronous_run(tiny_model, tokenizer, tmp_path, objective):
    # The generator process, the queue, the adapter sync and the learner's use of the recorded log-probs change
    # nothing when the schedule is synchronous: the same samples, rewards, KL and gradients as the plain loop.
    sync = train(make_trainer(tiny_model, tokenizer, tmp_path / "sync", objective))
    async_0 = train(make_trainer(tiny_model, tokenizer, tmp_path / "async", objective, async_generation=True,
                                 max_staleness=0))
    for plain, through_generator in zip(sync, async_0, strict=True):
        for key in COMPARED:
            assert through_generator[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    assert [m["async/staleness"] for m in async_0] == [0, 0, 0, 0]
    # the learner's memory in the stages it shares with the synchronous loop: the same (the base counted once)
    for plain, through_generator in zip(sync, async_0, strict=True):
        for stage in ("advantages", "train"):
            key = f"memory/{stage}_peak_bytes"
            assert through_generator[key] == pytest.approx(plain[key], rel=0.01), key

    # At staleness 1 the learner trains batch 1 on samples of the untrained actor, made while it trained on
    # batch 0: the generator's actor is its own copy, untouched by the learner's updates.
    trainer = make_trainer(tiny_model, tokenizer, tmp_path / "async1", objective, async_generation=True)
    untrained = ListChannel([])
    asynchronous.generate_batches(make_trainer(tiny_model, tokenizer, tmp_path / "x", objective).model,
                                  trainer.experience, untrained, start=0, end=2, max_staleness=1)
    async_1 = train(trainer)
    assert [m["async/policy_version"] for m in async_1] == [0, 0, 1, 2]
    assert [m["async/staleness"] for m in async_1] == [0, 1, 1, 1]
    assert all(m["async/dropped_samples"] == 0 for m in async_1)
    for iteration, batch in enumerate(untrained.batches):
        assert async_1[iteration]["objective/reward"] == pytest.approx(float(batch.rollout.raw_scores.mean()), rel=1e-5)
    assert async_1[2]["objective/reward"] != pytest.approx(sync[2]["objective/reward"], rel=1e-5)
    # adapter-only sync: the actor adapter's bytes, sent while a later batch still needs them
    adapter_bytes = sum(p.numel() * p.element_size() for p in asynchronous.actor_parameters(trainer.model))
    assert [m["async/sync_bytes"] for m in async_1] == [adapter_bytes, adapter_bytes, 0, 0]  # batch 3 needs version 2


def test_async_runs_with_fusion(tiny_model, tokenizer, tmp_path):
    # The generator makes its batches with the fused loop (finished rows retire and are scored while the rest
    # decode); through the synchronous schedule that is the synchronous fused run, counts included.
    sync = train(make_trainer(tiny_model, tokenizer, tmp_path / "sync", fusion=True, max_iterations=2))
    async_0 = train(make_trainer(tiny_model, tokenizer, tmp_path / "async", fusion=True, max_iterations=2,
                                 async_generation=True, max_staleness=0))
    for plain, through_generator in zip(sync, async_0, strict=True):
        for key in (*COMPARED, "fusion/decode_rows_computed", "score/padded_fraction"):
            assert through_generator[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key


def test_async_needs_an_adapter_policy(tiny_model, tokenizer, tmp_path):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, mode="full"))
    config = RLConfig(batch_size=4, minibatch_size=4, output_dir=str(tmp_path), async_generation=True)
    with pytest.raises(ValueError, match="mode 'full' has no adapter policy. Use mode hydra, j-hydra or lora"):
        RLTrainer(model, tokenizer, config, [[{"role": "user", "content": "Hi?"}]] * 8)


def test_the_generator_maps_the_learners_base(tiny_model, tokenizer, tmp_path):
    # One base in memory: the generator process reads the frozen base from the shared-memory segments the
    # learner's tensors live in (it holds no copy), and it is reaped when the channel closes.
    from hydra_rlhf.memory.profiler import torch_shared_bytes

    trainer = make_trainer(tiny_model, tokenizer, tmp_path, async_generation=True)
    trainer.profiler.close()
    model = trainer.model
    channel = asynchronous.LocalChannel(model, trainer.experience, 0, 4, 1)
    try:
        channel.receive_batch()
        shared = torch_shared_bytes(channel.process.pid, os.getpid())
        base = sum(p.numel() * p.element_size() for p in model.base_parameters())
        assert base <= shared < base + 2**20
    finally:
        channel.close()
    assert not channel.process.is_alive()


def tiny(tiny_model, prompts_file, output) -> list[str]:
    """Flags that shrink a shipped config to the tiny model, one short run."""
    return ["--model_name_or_path", tiny_model, "--lora_layers", "1", "--prompts_path", str(prompts_file),
            "--eval_prompts_path", "", "--max_iterations", "3", "--max_new_tokens", "5", "--save_every", "0",
            "--output_dir", str(output)]


@pytest.mark.parametrize("config", ["ppo_smollm2.yaml", "online_dpo_smollm2.yaml"])
def test_two_processes_give_the_one_device_run(tiny_model, prompts_file, tmp_path, config):
    # The README's commands: the generator as a child process, and the paper's layout (`accelerate launch
    # --num_processes 2`: rank 1 generates, rank 0 learns, adapters over torch.distributed). Same schedule, so
    # the same run.
    runs = {}
    for name, launcher in LAUNCHERS.items():
        output = tmp_path / name
        run([*launcher, "recipes/ppo.py", "--config", f"recipes/configs/{config}", "--async_generation", "true",
             "--max_staleness", "1", *tiny(tiny_model, prompts_file, output)], env={"OMP_NUM_THREADS": "1"})
        runs[name] = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((output / "summary.json").read_text())["iterations"] == 3
    assert [m["async/staleness"] for m in runs["one"]] == [0, 1, 1]
    for one, two in zip(runs["one"], runs["two"], strict=True):
        for key in (*COMPARED, "async/policy_version", "async/sync_bytes"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_stop_at_kl_ends_both_async_layouts_at_the_same_iteration(tiny_model, prompts_file, tmp_path):
    # The KL budget in async mode: the learner stops; the generator (child process, or rank 1 that may be
    # sending a batch or waiting for an adapter) is ended, and the two-process run exits instead of hanging.
    def metrics(output):
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    common = ["--config", "recipes/configs/ppo_smollm2.yaml", "--async_generation", "true", "--max_staleness", "1",
              "--actor_lr", "3e-3"]
    fixed = tmp_path / "fixed"
    run([PYTHON, "recipes/ppo.py", *common, "--stop_at_kl", "None", *tiny(tiny_model, prompts_file, fixed)],
        env={"OMP_NUM_THREADS": "1"})
    kls = [m["objective/kl"] for m in metrics(fixed)]
    window_means = {i: (kls[i - 2] + kls[i - 1]) / 2 for i in (2, 3)}
    budget = max(window_means.values()) * (1 - 1e-6)
    expected = min(i for i, mean in window_means.items() if mean >= budget)
    assert budget > 0
    for name, launcher in LAUNCHERS.items():
        output = tmp_path / name
        flags = [*tiny(tiny_model, prompts_file, output), "--max_iterations", "6", "--stop_at_kl", str(budget)]
        run([*launcher, "recipes/ppo.py", *common, *flags], env={"OMP_NUM_THREADS": "1"}, timeout=300)
        stopped = metrics(output)
        assert json.loads((output / "summary.json").read_text())["iterations"] == expected == len(stopped), name
        for before, after in zip(metrics(fixed), stopped):
            for key in COMPARED:
                assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (name, key)


class FailingMaker(ExperienceMaker):
    """Makes batch ``fail_at`` fail in the generator process: an exception, or a kill."""

    fail_at: int = 1
    how: str = "raise"

    def make(self, model, iteration, *args, **kwargs):
        if iteration == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("injected failure")
            os.kill(os.getpid(), signal.SIGKILL)
        return super().make(model, iteration, *args, **kwargs)


@pytest.mark.parametrize("how, message", [("raise", "the generator process failed: RuntimeError: injected failure"),
                                          ("kill", "the generator process died (exit code -9)")])
def test_a_failing_generator_stops_the_run_with_its_reason(tiny_model, tokenizer, tmp_path, how, message):
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, async_generation=True, max_iterations=6)
    failing = FailingMaker(**vars(trainer.experience))
    failing.how = how
    trainer.source.maker = failing
    started = time.perf_counter()
    with pytest.raises(asynchronous.GeneratorFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(trainer)
    assert time.perf_counter() - started < 60
    # it trained batch 0 and stopped at batch 1 (a killed generator may die before its queue sent batch 0)
    assert trainer.iteration == 1 if how == "raise" else trainer.iteration <= 1


def wait_for_iterations(process, output, count, deadline=300):
    deadline = time.time() + deadline
    while not (output / "metrics.jsonl").is_file() or len((output / "metrics.jsonl").read_text().splitlines()) < count:
        assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.2)


def test_the_generator_ends_when_the_learner_dies(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "run"
    config = ppo_config(tmp_path / "c.yaml", tiny_model, prompts_file, output, max_iterations=200, save_every=0,
                        async_generation=True)
    learner = subprocess.Popen([PYTHON, "recipes/ppo.py", "--config", str(config)], cwd=ROOT, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_iterations(learner, output, 1)
        (generator,) = [child for child in psutil.Process(learner.pid).children()
                        if "spawn_main" in " ".join(child.cmdline())]  # (not multiprocessing's resource tracker)
        learner.kill()
        learner.wait()
        generator.wait(timeout=10)  # its watchdog ends it within a poll interval
    finally:
        learner.kill()


def test_ctrl_c_then_resume_trains_every_batch_exactly_once(tiny_model, prompts_file, tmp_path):
    # Batches the generator had made when the run stopped are not lost: the resumed generator starts at the
    # learner's checkpoint and makes them again; none is trained twice. Counted by batch id over both runs.
    output = tmp_path / "run"
    iterations = 6
    config = ppo_config(tmp_path / "c.yaml", tiny_model, prompts_file, output, max_iterations=iterations,
                        save_every=0, async_generation=True, max_staleness=2)
    process = subprocess.Popen([PYTHON, "recipes/ppo.py", "--config", str(config)], cwd=ROOT, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_iterations(process, output, 1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "--resume true" in stderr.splitlines()[-1], stderr[-2000:]
    first = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(first) < iterations
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true"])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["async/batch"] for row in rows) == list(range(iterations))
    resumed = rows[len(first)]
    assert resumed["async/policy_version"] == len(first)  # the resumed generator starts from the checkpoint
    assert json.loads((output / "summary.json").read_text())["iterations"] == iterations


def test_async_benchmark_on_a_tiny_model(tiny_model, prompts_file, pairs_files, tmp_path):
    out = tmp_path / "async.json"
    shared = [f"model_name_or_path={tiny_model}", "lora_r=4", "lora_layers=1", "max_new_tokens=5", "max_iterations=2",
              "batch_size=4", "minibatch_size=4", "num_eval_prompts=4", f"prompts_path={prompts_file}",
              f"eval_prompts_path={prompts_file}"]
    sft = [f"model_name_or_path={tiny_model}", "lora_r=4", "lora_layers=1", f"train_path={pairs_files[0]}",
           f"eval_path={pairs_files[1]}", "max_train_pairs=16"]
    result = run([PYTHON, "benchmarks/async_rlhf.py", "--sft", str(tmp_path / "sft"), "--output_dir", str(tmp_path),
                  "--objectives", "online_dpo", "--staleness", "0,1", "--json", str(out), "--speed_iterations", "8",
                  *[flag for item in shared for flag in ("--set", item)],
                  *[flag for item in sft for flag in ("--sft_set", item)]], env={"OMP_NUM_THREADS": "1"})
    assert "Synchronous vs asynchronous" in result.stdout and "by staleness" in result.stdout
    data = json.loads(out.read_text())
    speed = data["speed"]
    assert {row["responses_generated"] for row in speed.values()} == {32}  # equal samples in every layout
    assert speed["async"]["staleness"] == speed["async_two_processes"]["staleness"] == [0] + [1] * 7
    assert data["speedup"] == pytest.approx(speed["sync"]["train_seconds"] / speed["async"]["train_seconds"])
    assert speed["async"]["sync_bytes"] > 0 and all(row["peak_pss_bytes"] > 0 for row in speed.values())
    assert speed["async"]["base_bytes_shared_with_generator"] > 0 == speed["sync"]["base_bytes_shared_with_generator"]
    assert speed["async"]["generator_private_bytes"] > 0
    assert set(data["robustness"]["online_dpo"]) == {"0", "1"}
    assert "online_dpo_staleness1_gold_delta" in data
