"""levers auto (hydra_rlhf/memory/plan.py): the plan a run makes from the estimate, what `hydra-rlhf estimate`
prints for a card or a budget, and the back-off on out-of-memory in the train stage."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import CLI, PYTHON, run
from hydra_rlhf.config import RLConfig, parse_bytes
from hydra_rlhf.memory.formulas import estimate
from hydra_rlhf.memory.plan import HEADROOM, OFF, plan_levers
from hydra_rlhf.memory.shape import GiB, EstimateSettings, load_preset
from test_trainer import write_config

SMOL = load_preset("smollm2-135m")
# the GRPO arithmetic recipe's shape, on a CPU
GRPO = EstimateSettings(objective="grpo", batch_size=4, num_samples_per_prompt=4, minibatch_size=8, lora_layers=12,
                        max_prompt_length=80, max_new_tokens=48, device="cpu")


def peak(settings) -> int:
    return estimate(SMOL, settings).peak_bytes


@pytest.mark.parametrize("text, expected", [("16GB", 16 * 10**9), ("15.5GiB", int(15.5 * GiB)), ("900MiB", 900 << 20),
                                            ("2048", 2048), (" 1 gib ", GiB)])
def test_budgets_read_in_decimal_and_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "16 GBs", "-1GB", "0", ""])
def test_a_bad_budget_is_one_line_naming_the_key(text):
    with pytest.raises(ValueError, match="memory_budget .*16GB"):
        RLConfig(memory_budget=text)


def test_a_generous_budget_keeps_every_lever_off():
    plan = plan_levers(SMOL, GRPO, 64 * GiB)
    assert plan.levers == OFF and plan.chosen == ()
    assert plan.estimate_bytes == peak(GRPO)


def test_tighter_budgets_turn_levers_on_in_order_of_their_time_cost():
    plans = [plan_levers(SMOL, GRPO, budget) for budget in (int(b * GiB) for b in (8, 1.4, 1.25, 1.0, 0.75))]
    # each plan fits its budget with the headroom kept free, and is the estimate of the levers it names
    for plan in plans:
        assert plan.estimate_bytes <= plan.budget_bytes * (1 - HEADROOM)
        assert plan.estimate_bytes == peak(replace(GRPO, **plan.levers))
    chosen = [plan.chosen for plan in plans]
    assert chosen[0] == () and chosen[1] == ("logprob_chunk_size",)  # chunks first: the same results, ~free
    assert chosen[-1][:2] == ("logprob_chunk_size", "gradient_checkpointing")
    assert all(a == b[:len(a)] for a, b in zip(chosen, chosen[1:]))  # a tighter budget only adds levers
    assert "activation_offload" not in chosen[-1]  # no effect on a CPU: never chosen there


def test_the_micro_batch_shrinks_last_and_the_minibatch_stays():
    plan = plan_levers(SMOL, replace(GRPO, batch_size=16, minibatch_size=64), int(1.2 * GiB))
    assert plan.chosen[-1] == "gradient_accumulation_steps"
    assert plan.minibatch == 64 and plan.micro_batch * plan.levers["gradient_accumulation_steps"] == 64
    # the largest micro-batch that fits: one more row per forward would not
    more = replace(GRPO, batch_size=16, minibatch_size=64, **{**plan.levers, "gradient_accumulation_steps":
                                                                 plan.levers["gradient_accumulation_steps"] // 2})
    assert peak(more) > plan.usable_bytes


def test_a_lever_set_by_hand_stays_as_set():
    no_checkpointing = replace(GRPO, gradient_checkpointing=False)
    plan = plan_levers(SMOL, no_checkpointing, int(1.0 * GiB), fixed=("gradient_checkpointing",))
    assert plan.levers["gradient_checkpointing"] is False and plan.fixed == ("gradient_checkpointing",)
    assert plan.levers["gradient_accumulation_steps"] > 1  # it found the memory elsewhere
    assert "set by hand: gradient_checkpointing" in plan.line()


def test_nothing_fits_is_one_line_naming_what_would():
    with pytest.raises(ValueError) as refused:
        plan_levers(SMOL, GRPO, int(0.4 * GiB))
    message = str(refused.value)
    assert "\n" not in message and "needs at least" in message and "no batch_size does" in message
    with pytest.raises(ValueError, match=r"batch_size \d+ would fit \(it is 64\)"):
        plan_levers(SMOL, replace(GRPO, batch_size=64, minibatch_size=None), int(0.9 * GiB),
                    fixed=("gradient_accumulation_steps",))


def test_estimate_prints_the_plan_for_a_card_and_writes_it(tmp_path):
    out = tmp_path / "plan.json"
    result = run([CLI, "estimate", "--preset", "llama-3.1-8b", "--quantization", "4bit", "--batch-size", "8",
                  "--gpu", "t4", "--json", str(out)])
    assert "hydra: memory plan (levers auto): " in result.stdout and "T4 16GB, usable" in result.stdout
    data = json.loads(out.read_text())
    assert data["plan"]["estimate_bytes"] == data["peak_bytes"] <= data["plan"]["budget_bytes"] * (1 - HEADROOM)
    assert data["settings"]["gradient_checkpointing"] == data["plan"]["levers"]["gradient_checkpointing"]
    # a lever given as a flag stays as given; without room, one error line
    kept = run([CLI, "estimate", "--preset", "llama-3.1-8b", "--quantization", "4bit", "--batch-size", "8",
                "--memory-budget", "40GB", "--no-gradient-checkpointing", "--json", str(out)])
    assert "set by hand: gradient_checkpointing" in kept.stdout
    assert json.loads(out.read_text())["settings"]["gradient_checkpointing"] is False
    for flags, words in ((["--memory-budget", "2GB"], "does not fit"), (["--gpu", "A100"], "matches several cards"),
                         (["--memory-budget", "plenty"], "give a positive size")):
        refused = run([CLI, "estimate", "--preset", "llama-3.1-8b", *flags], check=False)
        assert refused.returncode == 2 and refused.stderr.startswith("error: ") and words in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_a_run_plans_its_levers_from_its_budget(tiny_model, prompts_file, tmp_path):
    from hydra_rlhf.memory.formulas import estimate as estimate_run
    from hydra_rlhf.memory.shape import ModelShape

    shape = ModelShape.from_config(tiny_model)
    settings = EstimateSettings(batch_size=4, minibatch_size=4, max_prompt_length=64, max_new_tokens=8, lora_r=4,
                                device="cpu")
    roomy, tight = estimate_run(shape, settings).peak_bytes, estimate_run(shape, replace(
        settings, logprob_chunk_size=64, gradient_checkpointing=True)).peak_bytes
    budget = int((roomy + tight) / 2 / (1 - HEADROOM))  # room for some levers, not for none
    output = tmp_path / "planned"
    config = write_config(tmp_path / "a.yaml", tiny_model, prompts_file, output, minibatch_size=4, max_iterations=1,
                          eval_prompts_path="", memory_budget=f"{budget}B", pad_prompts_to_max_length=True)
    result = run([PYTHON, "recipes/ppo.py", "--config", str(config)])
    assert "memory plan (levers auto): gradient checkpointing; estimated peak" in result.stdout
    plan = json.loads((output / "memory_plan.json").read_text())
    summary = json.loads((output / "summary.json").read_text())
    assert summary["memory_plan"] == plan and summary["levers"] == plan["levers"] and plan["chosen"]
    assert summary["peak_bytes"] <= budget  # measured live tensors, never over the budget
    assert abs(summary["peak_bytes"] / plan["estimate_bytes"] - 1) < 0.10  # and near the plan's estimate
    # levers off, or every lever set by hand: no plan, the levers as set (unset ones off)
    run([PYTHON, "recipes/ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "off"), "--levers", "off"])
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["levers"] == OFF
    assert not (tmp_path / "off" / "memory_plan.json").exists()
    # a budget nothing fits: one line before the weights load, no run directory content
    refused = run([PYTHON, "recipes/ppo.py", "--config", str(config), "--output_dir", str(tmp_path / "no"),
                   "--memory_budget", "1MB"], check=False)
    assert refused.returncode == 2 and "error: levers auto: the run does not fit" in refused.stderr
    assert not (tmp_path / "no" / "checkpoints").exists()


def out_of_memory_above(rows: int):
    """An objective.loss that fails like CUDA's allocator on micro-batches of more than ``rows`` rows."""
    def wrap(loss):
        def guarded(model, targets, normalizer, stats):
            if len(targets.batch.input_ids) > rows:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return loss(model, targets, normalizer, stats)
        return guarded
    return wrap


def make_trainer(tiny_model, tokenizer, prompts_file, output, **settings):
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4), seed=0)
    config = RLConfig(prompts_path=str(prompts_file), batch_size=4, minibatch_size=4, max_new_tokens=6,
                      max_iterations=2, save_every=1, output_dir=str(output), seed=0, **settings)
    return RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])


def test_out_of_memory_in_train_halves_the_micro_batch_and_keeps_the_step(tiny_model, tokenizer, prompts_file,
                                                                          tmp_path, caplog):
    reference = make_trainer(tiny_model, tokenizer, prompts_file, tmp_path / "ref", gradient_accumulation_steps=4)
    backed_off = make_trainer(tiny_model, tokenizer, prompts_file, tmp_path / "oom")
    backed_off.objective.loss = out_of_memory_above(1)(backed_off.objective.loss)
    try:
        for _ in range(2):
            reference.step()
            metrics = backed_off.step()
    finally:
        reference.profiler.close()
        backed_off.profiler.close()
    assert backed_off.micro_batch == 1 and metrics["train/micro_batch"] == 1.0
    halvings = [r.message for r in caplog.records if "out of memory in train" in r.message]
    assert len(halvings) == 2 and "micro-batch 4" in halvings[0] and "micro-batch 1 " in halvings[1]  # 4 -> 2 -> 1, once
    for name, param in reference.model.named_parameters():  # the same updates as accumulating by hand
        if param.requires_grad:
            torch.testing.assert_close(dict(backed_off.model.named_parameters())[name], param, rtol=0, atol=1e-6)
    assert (tmp_path / "oom" / "checkpoints" / "iter-000002").is_dir()


def test_out_of_memory_at_one_row_stops_in_one_line_without_a_checkpoint(tiny_model, tokenizer, prompts_file, tmp_path,
                                                                         capsys):
    from hydra_rlhf.checkpoints import latest_intact_checkpoint
    from hydra_rlhf.errors import error_boundary

    trainer = make_trainer(tiny_model, tokenizer, prompts_file, tmp_path)
    trainer.objective.loss = out_of_memory_above(0)(trainer.objective.loss)
    capsys.readouterr()  # the loading bars
    try:
        status = error_boundary(trainer.step)  # as the recipes run it
    finally:
        trainer.profiler.close()
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1
    assert error.startswith("error: out of memory in train at one row per micro-batch (iteration 1)")
    assert latest_intact_checkpoint(tmp_path) is None


def test_out_of_memory_outside_train_is_one_line_naming_the_batch(capsys):
    from hydra_rlhf.errors import error_boundary

    def generate():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity\n"
                                     "of 15.00 GiB of which 1.00 GiB is free.")

    assert error_boundary(generate) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: out of memory (CUDA out of memory.")
    assert "lower batch_size" in error


def test_profile_runs_under_a_budget(tiny_model, tmp_path):
    from hydra_rlhf.memory.shape import ModelShape

    shape = ModelShape.from_config(tiny_model)
    settings = EstimateSettings(batch_size=2, max_prompt_length=64, max_new_tokens=8, device="cpu")
    budget = int(estimate(shape, replace(settings, gradient_checkpointing=True)).peak_bytes / (1 - HEADROOM)) + 1
    out = tmp_path / "profile.json"
    result = run([CLI, "profile", "--model", tiny_model, "--modes", "hydra", "--iterations", "1",
                  "--batch-size", "2", "--max-new-tokens", "8", "--memory-budget", f"{budget}B", "--json", str(out)])
    assert "memory plan (levers auto): gradient checkpointing" in result.stdout
    hydra = json.loads(out.read_text())["modes"]["hydra"]
    assert hydra["plan"]["levers"]["gradient_checkpointing"] is True
    assert hydra["peak_bytes"] <= budget


@pytest.mark.parametrize("name, card", [("T4", "T4 16GB"), ("l4", "L4 24GB"), ("L40S", "L40S 48GB"),
                                        ("a100 80", "A100 80GB"), ("RTX 4090 24GB", "RTX 4090 24GB")])
def test_a_card_by_its_short_name(name, card):
    from hydra_rlhf.memory.shape import find_gpu

    assert find_gpu(name).name == card
