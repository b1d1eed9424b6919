"""recipes/demo.py (what `make demo` runs) end to end on a tiny model: hydra and lora modes, and a critic-free
objective."""

import json

import pytest
import yaml

from conftest import PYTHON, run


@pytest.mark.parametrize("mode, objective", [("hydra", None), ("lora", None), ("hydra", "grpo")])
def test_demo_pipeline(tiny_model, prompts_file, pairs_files, tmp_path, mode, objective):
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({
        "model_name_or_path": tiny_model, "lora_r": 4, "train_path": str(pairs_files[0]),
        "eval_path": str(pairs_files[1]), "max_train_pairs": 16, "batch_size": 8,
    }))
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(yaml.safe_dump({
        "model_name_or_path": "replaced-by-the-demo", "mode": "hydra", "lora_r": 4,
        "prompts_path": str(prompts_file), "eval_prompts_path": str(prompts_file), "num_eval_prompts": 6,
        "batch_size": 4, "minibatch_size": 4, "max_new_tokens": 6, "max_iterations": 2, "save_every": 1,
    }))
    output = tmp_path / "demo"
    result = run([PYTHON, "recipes/demo.py", "--sft_config", str(sft), "--ppo_config", str(ppo),
                  "--output_dir", str(output), "--mode", mode, *(["--objective", objective] if objective else [])])
    assert "win-rate vs SFT" in result.stdout and "overall peak" in result.stdout
    summary = json.loads((output / "summary.json").read_text())
    for key in ("gold_before", "gold_after", "win_rate_vs_sft", "distinct2_before", "distinct2_after",
                "reward_head_accuracy", "wall_seconds", "memory"):
        assert key in summary, key
    assert set(summary["memory"]) == {"generate", "score_frozen", "score_policy", "advantages", "train", "log"}
    assert summary["mode"] == mode and summary["base_copies"] == (1 if mode == "hydra" else 2)
    assert summary["objective"] == (objective or "ppo") and summary["ppo_iterations"] == 2
    # the summary's figures are the paired comparison of the held-out evaluation, prompt by prompt
    paired = json.loads((output / "ppo" / "eval.json").read_text())["gold_per_prompt"]
    assert len(paired["before"]) == len(paired["after"]) == 6
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(paired["after"], paired["before"])]
    assert summary["win_rate_vs_sft"] == pytest.approx(sum(wins) / 6)
    assert summary["gold_gain"] == pytest.approx((sum(paired["after"]) - sum(paired["before"])) / 6)
    assert (output / "training.png").is_file() and (output / "memory.png").is_file()
    assert (output / "ppo" / "final" / "hydra_manifest.json").is_file()
    if mode == "lora":  # the baseline trains a plain SFT model and a separate reward model
        assert json.loads((output / "rm" / "sft_summary.json").read_text())["objective"] == "reward"
        assert json.loads((output / "sft" / "sft_summary.json").read_text())["objective"] == "sft"
