"""`benchmarks/seeds.py`: the seed sweep, on a tiny model (two seeds, hydra and lora, one iteration each)."""

import json
import statistics

import pytest

from conftest import PYTHON, run


def test_seed_sweep_on_a_tiny_model(tiny_model, prompts_file, pairs_files, tmp_path):
    out = tmp_path / "seeds.json"
    rl = {"lora_r": 4, "lora_layers": 1, "max_iterations": 2, "max_new_tokens": 4, "num_eval_prompts": 6,
          "save_every": 0, "prompts_path": prompts_file, "eval_prompts_path": prompts_file, "actor_lr": 3e-3}
    sft = {"model_name_or_path": tiny_model, "lora_r": 4, "lora_layers": 1, "train_path": pairs_files[0],
           "eval_path": pairs_files[1], "max_train_pairs": 16}
    result = run([PYTHON, "benchmarks/seeds.py", "--seeds", "0,1", "--modes", "hydra,lora", "--output_dir",
                  str(tmp_path), "--json", str(out), *[f for k, v in rl.items() for f in ("--set", f"{k}={v}")],
                  *[f for k, v in sft.items() for f in ("--sft_set", f"{k}={v}")]])
    assert "Mean +- std over 2 seeds" in result.stdout
    data = json.loads(out.read_text())
    assert sorted(data["runs"]) == ["hydra/ppo", "lora/ppo"]
    # one shared SFT start per mode: a Hydra-SFT checkpoint; a plain SFT model and a separate reward model
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["hydra", "rm", "sft"]
    hydra = data["runs"]["hydra/ppo"]
    assert [r["seed"] for r in hydra] == [0, 1] and all(r["iterations"] == 2 for r in hydra)
    assert hydra[0]["kl_to_reference"] != hydra[1]["kl_to_reference"]  # the seed reached the run
    for name, rows in data["runs"].items():
        summary = data["summary"][name]
        gains = [r["gold_gain"] for r in rows]
        assert summary["gold_gain"]["mean"] == pytest.approx(statistics.fmean(gains))
        assert summary["gold_gain"]["std"] == pytest.approx(statistics.stdev(gains))
        assert summary["seeds_meeting_targets"] == sum(r["meets_targets"] for r in rows)
    assert data["min_gold_gain"] == min(r["gold_gain"] for r in hydra)
    lora = data["runs"]["lora/ppo"]
    assert data["hydra_minus_lora"]["per_seed"] == pytest.approx([h["gold_gain"] - l["gold_gain"]
                                                                  for h, l in zip(hydra, lora)])
    # --reuse reads the finished runs back instead of training again; a second objective (the docstring's
    # --objectives sweep) trains beside them from the same shared start
    again = run([PYTHON, "benchmarks/seeds.py", "--seeds", "0,1", "--modes", "hydra", "--objectives", "ppo,rloo",
                 "--output_dir", str(tmp_path), "--reuse", "--json", str(tmp_path / "again.json"),
                 *[f for k, v in rl.items() for f in ("--set", f"{k}={v}")]])
    assert "SFT (" not in again.stdout
    reread = json.loads((tmp_path / "again.json").read_text())
    without_time = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]  # noqa: E731
    assert without_time(reread["runs"]["hydra/ppo"]) == without_time(hydra)
    rloo = reread["runs"]["hydra/rloo"]
    assert [(r["objective"], r["seed"]) for r in rloo] == [("rloo", 0), ("rloo", 1)]
    assert (tmp_path / "hydra" / "rloo" / "seed1" / "summary.json").exists()
    assert reread["summary"]["hydra/rloo"]["gold_gain"]["min"] == min(r["gold_gain"] for r in rloo)
    assert reread["min_gold_gain"] == data["min_gold_gain"]  # still the first objective's worst seed


def test_seed_sweep_rejects_unknown_names():
    result = run([PYTHON, "benchmarks/seeds.py", "--modes", "hydra,lorax"], check=False)
    assert result.returncode == 2 and "--modes: unknown or empty 'lorax'" in result.stderr
