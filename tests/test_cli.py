"""`hydra-rlhf profile`, `report` and `evaluate` as a user runs them (tiny model; the bundled one is the default)."""

import json
from pathlib import Path

import pytest

from conftest import CLI, PYTHON, run



def test_help_lists_the_commands():
    result = run([CLI, "--help"])
    for command in ("profile", "estimate", "report", "evaluate"):
        assert command in result.stdout


def test_profile_four_modes(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "profile.json"
    result = run([CLI, "profile", "--model", tiny_model, "--prompts", str(prompts_file), "--batch-size", "2",
                  "--gen-len", "4", "--iterations", "1", "--lora-r", "4", "--json", str(out)])
    assert "overall peak" in result.stdout
    data = json.loads(out.read_text())
    assert set(data) >= {"settings", "device", "measure", "modes", "ratios"}
    assert data["device"] == "cpu" and "tensor-storage" in data["measure"]
    copies = {mode: r["base_copies"] for mode, r in data["modes"].items()}
    assert copies == {"full": 4, "lora": 2, "j-hydra": 1, "hydra": 1}
    for mode, result in data["modes"].items():
        assert result["frozen_base_unchanged"] is True
        assert set(result["stages"]) == {"generate", "score_frozen", "score_policy", "advantages", "train", "log"}
        assert result["peak_bytes"] == max(s["peak_bytes"] for s in result["stages"].values())
    peaks = {mode: r["peak_bytes"] for mode, r in data["modes"].items()}
    assert peaks["full"] > peaks["lora"] > peaks["hydra"]
    assert data["ratios"]["hydra/full"] == pytest.approx(peaks["hydra"] / peaks["full"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_profile_rejects_bad_modes(tmp_path):
    result = run([CLI, "profile", "--modes", "hydra,turbo"], check=False)
    assert result.returncode == 2 and "Unknown mode 'turbo'" in result.stderr
    result = run([CLI, "profile", "--modes", "full", "--quant", "4bit"], check=False)
    assert result.returncode == 2 and "trains every weight" in result.stderr


def test_report_needs_a_memory_log(tmp_path):
    result = run([CLI, "report", str(tmp_path)], check=False)
    assert result.returncode == 2 and "memory.jsonl not found" in result.stderr
    (tmp_path / "memory.jsonl").write_text("not json\n")
    result = run([CLI, "report", str(tmp_path)], check=False)
    assert result.returncode == 2 and "line 1" in result.stderr


def test_evaluate_needs_a_checkpoint(tmp_path):
    result = run([CLI, "evaluate", str(tmp_path)], check=False)
    assert result.returncode == 2 and "hydra_manifest.json is missing" in result.stderr
    (tmp_path / "checkpoints").mkdir()
    result = run([CLI, "evaluate", str(tmp_path)], check=False)
    assert result.returncode == 2 and "no checkpoints under" in result.stderr


def test_profile_shows_what_dropping_the_critic_saves(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "objectives.json"
    result = run([CLI, "profile", "--model", tiny_model, "--prompts", str(prompts_file), "--modes", "hydra",
                  "--objective", "ppo,grpo", "--batch-size", "1", "--num-samples-per-prompt", "4",  # 4 rows each
                  "--gen-len", "4", "--iterations", "1",
                  "--lora-r", "4", "--json", str(out)])
    assert "hydra/grpo" in result.stdout and "peak hydra/grpo:ppo" in result.stdout
    data = json.loads(out.read_text())
    ppo, grpo = data["modes"]["hydra/ppo"], data["modes"]["hydra/grpo"]
    assert (ppo["objective"], grpo["objective"]) == ("ppo", "grpo")
    # PPO trains the actor adapter, a critic adapter of the same size and a value head Linear(h, 1); GRPO the actor's
    hidden = json.loads((Path(tiny_model) / "config.json").read_text())["hidden_size"]
    assert ppo["trainable_parameters"] - 2 * grpo["trainable_parameters"] == hidden + 1
    assert grpo["stages"]["train"]["peak_bytes"] < ppo["stages"]["train"]["peak_bytes"]
    assert data["ratios"]["hydra/grpo:ppo"] == pytest.approx(grpo["peak_bytes"] / ppo["peak_bytes"])
    result = run([CLI, "profile", "--modes", "hydra", "--objective", "ppo,dpo"], check=False)
    assert result.returncode == 2 and "Unknown objective 'dpo'" in result.stderr


def test_profile_and_estimate_take_the_memory_levers_and_fusion(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "levers.json"
    result = run([CLI, "profile", "--model", tiny_model, "--prompts", str(prompts_file), "--modes", "hydra",
                  "--batch-size", "4", "--gen-len", "8", "--iterations", "2", "--lora-r", "4",
                  "--gradient-checkpointing", "--logprob-chunk-size", "8", "--optim", "adamw_bnb_8bit", "--fusion",
                  "--json", str(out)])
    assert "generate+score" in result.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["logprob_chunk_size"] == 8 and data["settings"]["optim"] == "adamw_bnb_8bit"
    hydra = data["modes"]["hydra"]
    assert set(hydra["stages"]) == {"generate+score", "advantages", "train", "log"}
    assert 0 < hydra["persistent_bytes"] <= hydra["stages"]["log"]["peak_bytes"]
    estimate = run([CLI, "estimate", "--preset", "llama-3.1-70b", "--quant", "4bit", "--batch-size", "4",
                    "--gradient-checkpointing", "--all-levers", "--json", str(tmp_path / "e.json")])
    assert "Levers: log-prob chunks of 256, 8-bit AdamW, activation offload, bfloat16 adapters" in " ".join(estimate.stdout.split())
    assert "pinned host memory" in estimate.stdout and "L40S 48GB" in estimate.stdout
    assert json.loads((tmp_path / "e.json").read_text())["host_bytes"] > 0
    bad = run([CLI, "estimate", "--dtype", "fp16", "--adapter-dtype", "compute"], check=False)
    assert bad.returncode == 2 and "float16 base" in bad.stderr


def test_memory_levers_benchmark_measures_each_lever(tiny_model, tmp_path):
    out = tmp_path / "levers.json"
    result = run([PYTHON, "benchmarks/memory_levers.py", "--model", tiny_model, "--batch-size", "4", "--prompt-len",
                  "32", "--gen-len", "16", "--chunk-size", "16", "--estimate-batches", "4,2", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"none", "logprob_chunk_size", "optim", "all"}  # the other two need CUDA / bf16
    assert set(data["skipped"]) == {"activation_offload", "adapter_dtype"}
    runs = data["runs"]
    assert runs["logprob_chunk_size"]["train_above_persistent_bytes"] < runs["none"]["train_above_persistent_bytes"]
    assert runs["all"]["cut"] == pytest.approx(1 - runs["all"]["train_above_persistent_bytes"]
                                               / runs["none"]["train_above_persistent_bytes"])
    assert [check["settings"]["batch_size"] for check in data["estimate_accuracy"]] == [4, 2]
    assert data["worst_estimate_error"] < 0.5 and "all levers:" in result.stdout


def test_evaluate_tells_apart_checkpoints_of_several_runs(tmp_path):
    """`hydra-rlhf evaluate runs/a runs/b`: the seeds' iter-000012 get their run's name in the table."""
    from hydra_rlhf.cli import checkpoint_labels

    one_run = [tmp_path / "run" / "checkpoints" / name for name in ("iter-000006", "iter-000012")]
    assert list(checkpoint_labels(one_run).values()) == ["iter-000006", "iter-000012"]
    seeds = [tmp_path / f"seed{seed}" / "checkpoints" / "iter-000012" for seed in (0, 1)]
    assert list(checkpoint_labels(seeds).values()) == ["seed0/checkpoints/iter-000012",
                                                       "seed1/checkpoints/iter-000012"]
