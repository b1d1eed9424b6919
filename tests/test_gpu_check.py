"""The GPU check's dry pass: without CUDA, benchmarks/gpu_check.py says so in one line, runs its own plumbing on a
tiny random model, and writes every key (null where not measured, with the reason per part)."""

import importlib.util
import json
import sys

import pytest

from conftest import PYTHON, ROOT, run
from hydra_rlhf.config import AUTO_LEVERS

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
spec.loader.exec_module(gpu_check)

TOP_KEYS = {"device", "cuda", "dry_run", "measure", "deadline_seconds", "wall_seconds", "versions", "note", "parts"}
STATUS_KEYS = {"budget_seconds", "seconds", "skipped", "error"}


@pytest.fixture(scope="module")
def dry_pass(tmp_path_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would measure, not dry-run")
    path = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    result = run([PYTHON, "benchmarks/gpu_check.py", "--json", str(path)], timeout=900, check=False)
    assert path.is_file(), result.stderr[-3000:]
    return result, json.loads(path.read_text())


def test_dry_pass_says_so_in_one_line_and_exits_0(dry_pass):
    result, results = dry_pass
    errors = {name: part["error"] for name, part in results["parts"].items() if part["error"]}
    assert result.returncode == 0 and not errors, errors
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("No CUDA device")


def test_dry_pass_writes_every_key(dry_pass):
    _, results = dry_pass
    assert set(results) == TOP_KEYS and results["dry_run"] and not results["cuda"]
    assert list(results["parts"]) == [part.name for part in gpu_check.PARTS]
    for part in gpu_check.PARTS:
        assert set(results["parts"][part.name]) == set(part.keys) | STATUS_KEYS, part.name
        assert results["parts"][part.name]["error"] is None, results["parts"][part.name]["error"]


def test_parts_that_run_on_a_cpu_have_numbers(dry_pass):
    _, results = dry_pass
    parts = results["parts"]
    for mode in ("lora", "hydra"):
        entry = parts["memory_modes"]["modes"][mode]
        assert entry["peak_bytes"] > 0 and entry["estimated_peak_bytes"] > 0 and entry["ratio"] > 0
        assert entry["stages"]["train"]["estimated_bytes"] > 0 and entry["reserved_peak_bytes"] is None  # CUDA only
    preset = parts["random_presets"]["presets"]["tiny-llama"]
    assert preset["settings"]["quantization"] == "4bit" and preset["levers_on"]["peak_bytes"] > 0
    assert isinstance(parts["random_presets"]["all_within_10pct"], bool)
    planned = parts["planned_memory"]["runs"]["tiny-llama"]  # levers auto, planning for a T4's usable memory
    assert planned["plan"]["budget_source"] == "memory_budget" and set(planned["plan"]["levers"]) == set(AUTO_LEVERS)
    assert planned["peak_bytes"] > 0 and planned["ratio"] > 0 and isinstance(planned["within_10pct"], bool)
    assert parts["sampling"]["hf_tokens_per_second"] > 0 and parts["sampling"]["fused_tokens_per_second"] > 0
    assert parts["sampling"]["vllm_tokens_per_second"] is None and parts["sampling"]["vllm_skipped"]
    assert parts["fused_second_stream"]["tokens_per_second"] is None
    assert "not implemented" in parts["fused_second_stream"]["skipped"]
    assert parts["fusion"]["speedup"] > 0 and parts["fusion"]["same_tokens"] and parts["fusion"]["equal_scores"]
    assert parts["latency"]["hydra_vs_lora_time"] > 0
    assert parts["async"]["speedup"] > 0 and parts["async"]["base_bytes"] > 0
    assert parts["async"]["peak_memory_bytes"]["async"] > 0 and parts["async"]["base_counted_once"] is None
    sharded = parts["sharded_load"]  # a 4-bit base loaded on the host, wrapped by FSDP2 on one rank, trained through
    assert sharded["all_on_device"] and sharded["finite_gradients"] and sharded["nonzero_adapter_gradients"]
    assert sharded["generated_tokens"] == sharded["settings"]["gen_len"]


def test_parts_and_modes_select_what_runs(tmp_path):
    path = tmp_path / "some.json"
    result = run([PYTHON, "benchmarks/gpu_check.py", "--json", str(path), "--parts", "memory_modes,fused_second_stream",
                  "--modes", "hydra"], timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = json.loads(path.read_text())["parts"]
    assert list(parts["memory_modes"]["modes"]) == ["hydra"] and parts["memory_modes"]["error"] is None
    others = {name for name, part in parts.items() if part["skipped"] == "not selected (--parts)"}
    assert others == {part.name for part in gpu_check.PARTS} - {"memory_modes", "fused_second_stream"}
    assert all(set(parts[name]) == set(part.keys) | STATUS_KEYS for name, part in
               ((part.name, part) for part in gpu_check.PARTS))
    wrong = run([PYTHON, "benchmarks/gpu_check.py", "--parts", "memory_mode"], check=False)
    assert wrong.returncode == 2 and "no part named memory_mode; the parts: memory_modes," in wrong.stderr
    wrong = run([PYTHON, "benchmarks/gpu_check.py", "--modes", "hydra,jhydra"], check=False)
    assert wrong.returncode == 2
    assert "--modes: no mode named jhydra; the modes: full, lora, j-hydra, hydra" in wrong.stderr


def test_a_failed_command_keeps_its_stderr_tail(tmp_path):
    log = tmp_path / "check.failures.log"
    check = gpu_check.Check(cuda=False, deadline=gpu_check.time.monotonic() + 60, scratch=tmp_path, failures=log)
    check.part_ends = check.deadline
    script = "import sys; print('WARNING iteration 1: non-finite rewards', file=sys.stderr); sys.exit('error: stop')"
    with pytest.raises(RuntimeError, match="error: stop"):
        check.command(["-c", script])
    kept = log.read_text()
    assert kept.startswith("$ python -c import sys;") and "WARNING iteration 1: non-finite rewards\nerror: stop" in kept


def test_budgets_stretch_to_the_time_there_is_but_never_shrink():
    every = gpu_check.shared_budgets(list(gpu_check.PARTS), 60)
    assert every == {part.name: part.budget for part in gpu_check.PARTS}  # short of time: later parts get skipped
    first, last = gpu_check.PARTS[0], gpu_check.PARTS[-1]
    two = gpu_check.shared_budgets([first, last], 2 * (first.budget + last.budget))
    assert two == pytest.approx({first.name: 2 * first.budget, last.name: 2 * last.budget})


def test_a_missing_package_skips_a_part_with_its_reason(tmp_path):
    check = gpu_check.Check(cuda=True, deadline=gpu_check.time.monotonic() + 1000, scratch=tmp_path)
    part = gpu_check.Part("needs_nothing_here", 10, ("value",), lambda *args: None, needs=("no_such_package_xyz",))
    result = gpu_check.run_part(check, part, {})
    assert result["value"] is None and result["skipped"] == "needs no_such_package_xyz (not installed)"


def test_a_part_past_the_deadline_is_skipped(tmp_path):
    check = gpu_check.Check(cuda=True, deadline=gpu_check.time.monotonic() + 30, scratch=tmp_path)
    part = gpu_check.Part("too_long", 60, ("value",), lambda *args: None, needs=())
    result = gpu_check.run_part(check, part, {})
    assert "would pass the deadline" in result["skipped"] and result["seconds"] is None


def test_a_failing_part_records_one_line_and_the_levers_map_to_both_clis(tmp_path):
    from hydra_rlhf.config import ALL_ON

    def broken(check, models, out):
        out["value"] = 1
        raise RuntimeError("recipes/ppo.py: error: something broke\nsecond line")

    check = gpu_check.Check(cuda=True, deadline=gpu_check.time.monotonic() + 1000, scratch=tmp_path)
    result = gpu_check.run_part(check, gpu_check.Part("broken", 10, ("value",), broken, needs=()), {})
    assert result["value"] == 1 and result["error"] == "RuntimeError: recipes/ppo.py: error: something broke"
    recipe, estimate = gpu_check.lever_flags(ALL_ON.lever_values())
    assert recipe == ["--logprob_chunk_size", "256", "--optim", "adamw_bnb_8bit", "--activation_offload", "true",
                      "--adapter_dtype", "compute"]
    assert estimate == ["--logprob-chunk-size", "256", "--optim", "adamw_bnb_8bit", "--activation-offload",
                        "--adapter-dtype", "compute"]
