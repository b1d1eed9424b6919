"""`benchmarks/reward_curve.py`: the reward head's learning curve, on a tiny model and the easy lexical pairs."""

import json

import pytest
import torch

from conftest import PYTHON, run


def test_reward_curve_on_a_tiny_model(tiny_model, pairs_files, tmp_path):
    out = tmp_path / "curve.json"
    # the judge's scores: every third pair is a near-tie (margin 0.05), the rest differ by 0.5
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in pairs_files[0].read_text().splitlines()]
    train.write_text("".join(json.dumps({**row, "chosen_score": 0.5, "rejected_score": 0.45 if i % 3 == 0 else 0.0})
                             + "\n" for i, row in enumerate(rows)))
    sft = {"model_name_or_path": tiny_model, "lora_r": 4, "lora_layers": 1, "train_path": train,
           "eval_path": pairs_files[1], "batch_size": 8, "learning_rate": 3e-3, "head_learning_rate": 3e-2}
    flags = [f for k, v in sft.items() for f in ("--sft_set", f"{k}={v}")]
    result = run([PYTHON, "benchmarks/reward_curve.py", "--sizes", "4,16,all", "--recipe_sizes", "8", "--margins", "0.1",
                  "--layers", "all", "--output_dir", str(tmp_path), "--json", str(out), *flags])
    assert "Reward head refit on the first N training pairs" in result.stdout
    data = json.loads(out.read_text())
    refit = data["refit"]
    # the pairs file has 48 usable pairs (and two rows skipped); 'all' is every one of them
    assert refit["sizes"] == [4, 16, "all"] and refit["pairs"] == [4, 16, 48]
    assert refit["train_pairs"] == 48 and refit["eval_pairs"] == 16
    assert refit["shipped_pooling"] == "sum"  # the demo SFT config's
    for pooling in ("last", "mean", "sum"):
        assert len(refit[pooling]) == 3 and all(0.0 <= a <= 1.0 for a in refit[pooling])
    assert refit["sum"][-1] >= 0.9  # the lexical preference is easy for a summed read fit on all pairs
    # the 48 usable pairs are rows 0-47: 16 of them (i % 3 == 0) are near-ties, 32 are left at margin 0.1
    (margin,) = refit["by_margin"]
    assert margin["min_margin"] == 0.1 and margin["pairs_available"] == 32 and margin["pairs"] == [4, 16, 32]
    assert all(0.0 <= a <= 1.0 for a in margin["accuracy"])
    assert "whose judge scores differ by at least a margin" in result.stdout
    # --layers all: the tiny model's 2 layers, the embeddings and the final states, each refit on all 48 pairs
    assert [row["layer"] for row in refit["by_layer"]] == [0, 1, 2, "final"]
    assert all(0.5 <= row["cv"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0 for row in refit["by_layer"])
    (shipped,) = [row for row in refit["by_layer"] if row["layer"] == refit["shipped_layer"]]
    assert shipped["accuracy"] == refit["sum"][-1]  # the curve's last point: the same head on the same features
    assert "per layer it reads" in " ".join(result.stdout.split())  # the title wraps to the narrow table
    recipe = data["recipe"]
    assert [(r["size"], r["pairs"], r["steps"]) for r in recipe] == [(8, 8, 1)]
    summary = json.loads((tmp_path / "recipe" / "8" / "sft_summary.json").read_text())
    assert recipe[0]["reward_head_accuracy"] == summary["eval"]["reward_accuracy"]
    # --reuse reads the finished recipe run back instead of training again
    again = run([PYTHON, "benchmarks/reward_curve.py", "--sizes", "all", "--recipe_sizes", "8", "--reuse",
                 "--output_dir", str(tmp_path), "--json", str(tmp_path / "again.json"), *flags])
    assert "Hydra-SFT on 8 pairs" not in again.stdout
    assert json.loads((tmp_path / "again.json").read_text())["recipe"] == recipe


def test_pair_accuracy_counts_ties_half():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "reward_curve", Path(__file__).resolve().parents[1] / "benchmarks" / "reward_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    head = torch.nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.zero_()
    chosen, rejected = torch.tensor([[2.0], [1.0], [0.0], [5.0]]), torch.tensor([[1.0], [1.0], [3.0], [4.0]])
    assert module.pair_accuracy(head, chosen, rejected) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_reward_curve_rejects_bad_sizes():
    result = run([PYTHON, "benchmarks/reward_curve.py", "--sizes", "250,lots"], check=False)
    assert result.returncode == 2 and "--sizes: 'lots' is neither a positive number of pairs nor 'all'" in result.stderr
    result = run([PYTHON, "benchmarks/reward_curve.py", "--margins", "0.1,wide"], check=False)
    assert result.returncode == 2 and "--margins takes comma-separated numbers" in result.stderr
    result = run([PYTHON, "benchmarks/reward_curve.py", "--layers", "1,top"], check=False)
    assert result.returncode == 2 and "--layers: 'top' is neither a layer number, 'final' nor 'all'" in result.stderr
