"""benchmarks/defaults.py's plumbing, without TRL or the real model: the flags parse, the run list, the medians and
ratios it reports, the plan checks, and the RSS measurement of a child process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "defaults.py"


@pytest.fixture(scope="module")
def defaults():
    spec = importlib.util.spec_from_file_location("defaults_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_help_parses():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "--json" in result.stdout and "--trl_micro_batch" in result.stdout


def test_run_list_interleaves_trl_and_ours(defaults):
    result = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    assert names[:2] == ["trl-function-frugal", "ours-grpo-levers"]
    assert {"trl-reward_model-frugal", "ours-ppo-default", "trl-function-default"} <= set(names)


def test_unknown_run_is_one_line_error():
    result = subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown run(s) nope" in result.stderr


def test_median_skips_the_first_iteration(defaults):
    assert defaults.median_after_first([30.0, 10.0, 12.0, 11.0]) == 11.0  # 30 s of warm-up left out
    assert defaults.median_after_first([7.0]) == 7.0
    assert defaults.median_after_first([]) is None


def test_ratio_and_targets(defaults):
    assert defaults.ratio(8, 10) == 0.8
    assert defaults.ratio(None, 10) is None
    gib = defaults.GIB
    runs = {
        "trl-function-frugal": {"peak_rss_bytes": 2 * gib},
        "trl-reward_model-frugal": {"peak_rss_bytes": 3 * gib},
        "ours-grpo-levers": {"peak_rss_bytes": int(1.5 * gib)},
        "ours-grpo-default": {"peak_rss_bytes": 2 * gib},
        "ours-ppo-levers": {"peak_rss_bytes": gib},  # PPO is not the GRPO comparison's
        "ours-grpo-auto": {"1GiB": {"peak_rss_bytes": int(1.6 * gib)}, "800MiB": {"error": "error: does not fit"}},
    }
    compared = defaults.comparisons(runs)
    assert compared["function"]["ratio"] == 0.75 and compared["function"]["met"]
    assert compared["reward_model"]["ratio"] == 0.5 and compared["reward_model"]["met"]


def test_plan_checks(defaults):
    plan = {"budget_bytes": 1000, "estimate_bytes": 950}
    assert defaults.check_plan(plan, 900) == {"peak_over_budget": False, "estimate_error": 0.0556,
                                              "estimate_within_10pct": True}
    assert defaults.check_plan(plan, 1100)["peak_over_budget"]
    assert not defaults.check_plan({"budget_bytes": 2000, "estimate_bytes": 500}, 1000)["estimate_within_10pct"]


def test_trl_settings_keep_eight_samples_per_step(defaults):
    for frugal in (False, True):
        settings = defaults.trl_settings("function", frugal, 1)
        assert settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"] == defaults.MINIBATCH
    assert defaults.trl_settings("function", True, 2)["gradient_accumulation_steps"] == 4


def test_child_peak_rss_is_measured(defaults):
    """A child that holds ~200 MB for a moment: the polled and the exit figures both see it."""
    child = defaults.run_measured(["-c", "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); "
                                   "time.sleep(0.3)"], threads=1)
    assert child.returncode == 0, child.output
    assert child.exit_maxrss_bytes > 200 << 20
    assert child.polled_peak_bytes > 150 << 20
    assert child.peak_rss_bytes >= child.exit_maxrss_bytes


# The cuts to our peak RSS that the benchmark measures (hydra_rlhf/model/hydra.py) change nothing else:


def test_frozen_hash_in_place_equals_the_hash_of_copied_bytes():
    import hashlib

    import torch

    from hydra_rlhf.model.sharding import weights_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a non-contiguous weight
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):  # what the hash was before: a copy of every weight
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert weights_fingerprint(model) == digest.hexdigest()


def test_dropout_off_and_heap_trim_is_harmless():
    import torch

    from hydra_rlhf.model.hydra import _disable_dropout, release_freed_host_memory

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    _disable_dropout(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0, 0]
    release_freed_host_memory()  # a no-op where the C library is not glibc


def test_tightest_leaves_out_a_changed_environment(defaults):
    runs = {"ours-grpo-levers": {"peak_rss_bytes": 10}, "ours-grpo-levers-mmap4m": {"peak_rss_bytes": 5, "env": {"X": "1"}}}
    assert defaults.tightest(runs)["peak_rss_bytes"] == 10


@pytest.mark.parametrize("config", ["GRPO_CONFIG", "PPO_CONFIG"])
def test_our_runs_pin_the_shape_the_trl_runs_copy(defaults, config):
    # The recipes' budget and rewards may be tuned later; the comparison with TRL must not move with them.
    from trl import TrlParser

    from hydra_rlhf.config import HydraModelConfig, RLConfig

    path = getattr(defaults, config)
    _, rl = TrlParser([HydraModelConfig, RLConfig]).parse_args_and_config(
        ["--config", path, *defaults.OUR_SHAPE[path]])
    assert rl.batch_size * rl.samples_per_prompt == defaults.PROMPTS * defaults.SAMPLES
    assert (rl.num_epochs, rl.actor_lr, rl.minibatch_size) == (defaults.PASSES, defaults.LEARNING_RATE,
                                                               defaults.MINIBATCH)
    assert (rl.max_new_tokens, rl.temperature, rl.kl_coef) == (defaults.MAX_NEW_TOKENS, defaults.TEMPERATURE,
                                                                defaults.KL_COEF)
    assert (rl.reward_funcs, rl.reward_weights) == (["accuracy", "format"], [1.0, 0.1])  # what trl_settings passes
