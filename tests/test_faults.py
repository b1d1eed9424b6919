"""Bad input and faults, as a new user meets them: each one is a one-line `error:` (or a counted skip), never a
traceback or a silent wrong run; nothing on disk is trusted without checking it."""

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CLI, PYTHON, ROOT, run



def one_line_error(result, *expected: str, code: int = 2) -> str:
    """The run failed with ``code`` and told the user in one `error:` line containing ``expected``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------- settings, in-process


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(actor_lr=-0.01), "actor_lr must be > 0, got -0.01"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(critic_lr=0), "critic_lr must be > 0"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(batch_size=0), "batch_size must be at least 1"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(num_eval_prompts=0), "num_eval_prompts must be at least 1"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(top_p=0), "top_p must be in (0, 1]"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(kl_coef=-1), "kl_coef must be >= 0"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(reward_normalization="whiten"),
     "Unknown reward_normalization 'whiten'"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(minibatch_size=32), "must be a multiple of minibatch_size"),
    (lambda: __import__("hydra_rlhf.config").config.RLConfig(missing_eos_penalty=1.0, stop_at_eos=False),
     "missing_eos_penalty needs stop_at_eos"),
    (lambda: __import__("hydra_rlhf.sft").sft.SFTConfig(learning_rate=-1e-4), "learning_rate must be > 0"),
    (lambda: __import__("hydra_rlhf.sft").sft.SFTConfig(head_learning_rate=0), "head_learning_rate must be > 0"),
    (lambda: __import__("hydra_rlhf.sft").sft.SFTConfig(batch_size=0), "batch_size must be at least 1"),
    (lambda: __import__("hydra_rlhf.sft").sft.SFTConfig(max_length=0), "max_length must be at least 1"),
    (lambda: __import__("hydra_rlhf.config").config.ModelConfig(lora_r=0), "lora_r must be > 0"),
    (lambda: __import__("hydra_rlhf.config").config.ModelConfig(dtype="fp8"), "Unknown dtype 'fp8'"),
    (lambda: __import__("hydra_rlhf.memory.profile").memory.profile.ProfileSettings(batch_size=0), "batch_size"),
    (lambda: __import__("hydra_rlhf.memory.shape").memory.shape.EstimateSettings(batch_size=4, minibatch_size=8),
     "must be a multiple of minibatch_size (8)"),
])
def test_impossible_settings_are_refused_before_anything_loads(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert message in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------- data files


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_data_files_name_the_file_and_the_row(tmp_path):
    from hydra_rlhf.data import load_preferences, load_prompts

    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "hi"}), "{not json", json.dumps({"prompt": "x"})])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_prompts(str(bad))
    pairs = write_lines(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}), "[1, 2]"])
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 2: expected a JSON object"):
        load_preferences(str(pairs))
    with pytest.raises(ValueError, match="empty.jsonl holds no rows"):
        load_prompts(str(write_lines(tmp_path / "empty.jsonl", [])))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "no" / "such" / "prompts"))  # no suffix: still a path, not a hub dataset
    with pytest.raises(ValueError, match="unknown data format .csv"):
        load_prompts(str(write_lines(tmp_path / "p.csv", ["prompt", "hello"])))


def test_prompts_that_are_not_text_are_counted_as_such(tmp_path):
    from hydra_rlhf.data import load_preferences, load_prompts

    rows = [json.dumps({"prompt": p}) for p in ("Hello?", 42, "", "Hi")]
    prompts, skipped = load_prompts(str(write_lines(tmp_path / "p.jsonl", rows)))
    assert len(prompts) == 2 and skipped == {"not text (int) prompt": 1, "empty prompt": 1}
    with pytest.raises(ValueError, match="no usable prompts in column 'prompt'"):
        load_prompts(str(write_lines(tmp_path / "none.jsonl", [json.dumps({"prompt": 7})])))
    pairs = [json.dumps({"prompt": "q", "chosen": 3, "rejected": "r"}), json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"})]
    kept, skipped = load_preferences(str(write_lines(tmp_path / "pairs.jsonl", pairs)))
    assert len(kept) == 1 and skipped == {"not text (int)": 1}


# ----------------------------------------------------------------------------------------- model paths


def test_model_paths_that_are_not_models(tiny_model, tmp_path, monkeypatch):
    from hydra_rlhf.model.loading import check_context, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="Model directory runs/sft does not exist"):
        resolve_model("runs/sft")  # runs/ exists here: a path, not the hub id 'runs/sft'
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    from hydra_rlhf.model.loading import load_causal_lm

    with pytest.raises(FileNotFoundError, match="empty is not a directory transformers can load"):
        load_causal_lm(str(empty))
    checkpoint = tmp_path / "final"
    checkpoint.mkdir()
    (checkpoint / "hydra_manifest.json").write_text(json.dumps({"config": {"model_name_or_path": "/bases/sft"}}))
    with pytest.raises(ValueError, match="is a hydra-rlhf PPO checkpoint .* its base is /bases/sft"):
        resolve_model(str(checkpoint))
    limit = json.loads((Path(tiny_model) / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"max_prompt_length \\+ max_new_tokens = {limit + 1} tokens, more than"):
        check_context(tiny_model, limit + 1, "max_prompt_length + max_new_tokens")
    check_context(tiny_model, limit, "fits")


# ----------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_verified(tmp_path, caplog):
    from hydra_rlhf.checkpoints import clean_staging, latest_intact_checkpoint, verify, write_atomically

    def writer(text):
        return lambda staging: (staging / "adapter.bin").write_text(text)

    first = write_atomically(tmp_path / "checkpoints" / "iter-000001", writer("one"))
    second = write_atomically(tmp_path / "checkpoints" / "iter-000002", writer("two"))
    assert verify(first) is None and verify(second) is None

    def crash(staging):  # killed while writing: the old directory stays whole, a staging directory is left
        (staging / "adapter.bin").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(second, crash)
    assert (second / "adapter.bin").read_text() == "two"
    assert [p.name for p in clean_staging(tmp_path)] == [f".tmp-iter-000002-{os.getpid()}"]

    with open(second / "adapter.bin", "r+") as f:  # truncated on disk afterwards
        f.truncate(1)
    assert "adapter.bin has 1 bytes, 3 were written" in verify(second)
    with caplog.at_level(logging.WARNING):
        assert latest_intact_checkpoint(tmp_path) == first
    assert "Skipping checkpoint" in caplog.text and "iter-000002" in caplog.text
    (first / "adapter.bin").write_text("eno")  # same size, other bytes
    assert verify(first) == "adapter.bin changed since it was written"
    assert latest_intact_checkpoint(tmp_path) is None


def test_resume_refuses_other_settings(tiny_model, tmp_path):
    from dataclasses import replace

    from hydra_rlhf.checkpoints import record_or_check_run_settings, run_settings
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.config import HydraModelConfig

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        (base / name).write_bytes((Path(tiny_model) / name).read_bytes())
    model, config = HydraModelConfig(model_name_or_path=str(base), lora_r=4), RLConfig()
    record_or_check_run_settings(tmp_path / "first", run_settings(model, config), resume=True)  # nothing to resume
    assert (tmp_path / "first" / "run_settings.json").is_file()  # ... so it starts, and records its settings
    record_or_check_run_settings(tmp_path, run_settings(model, config), resume=False)
    record_or_check_run_settings(tmp_path, run_settings(model, replace(config, actor_lr=1e-5)), resume=True)  # fine
    for changed, expected in [(replace(model, lora_alpha=256), "lora_alpha was 32, now 256"),
                              (replace(model, lora_r=8), "lora_r was 4, now 8"),
                              (replace(model, mode="lora"), "mode was 'hydra', now 'lora'"),
                              (replace(model, lora_layers=1), "lora_layers was None, now 1")]:
        with pytest.raises(ValueError, match=expected):
            record_or_check_run_settings(tmp_path, run_settings(changed, config), resume=True)
    with pytest.raises(ValueError, match="objective was 'ppo', now 'grpo'"):
        record_or_check_run_settings(tmp_path, run_settings(model, RLConfig(objective="grpo")), resume=True)
    with pytest.raises(ValueError, match="optim was 'adamw_torch', now 'adamw_bnb_8bit'"):  # other optimizer states
        record_or_check_run_settings(tmp_path, run_settings(model, replace(config, optim="adamw_bnb_8bit")), resume=True)
    with pytest.raises(ValueError, match="adapter_dtype was 'float32', now 'compute'"):
        record_or_check_run_settings(tmp_path, run_settings(replace(model, adapter_dtype="compute"), config), resume=True)
    recorded = json.loads((tmp_path / "run_settings.json").read_text())
    del recorded["optim"]  # a run recorded before the key existed resumes unchecked on it
    (tmp_path / "run_settings.json").write_text(json.dumps(recorded))
    record_or_check_run_settings(tmp_path, run_settings(model, config), resume=True)
    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # the base retrained: other weights, same size
    (base / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="the weights in .*base changed since the run started"):
        record_or_check_run_settings(tmp_path, run_settings(model, config), resume=True)


# ---------------------------------------------------------------------------------- the error boundary


def test_the_error_boundary(monkeypatch, capsys):
    from hydra_rlhf.errors import NonFiniteError, error_boundary

    def fail(error):
        def run():
            raise error
        return run

    assert error_boundary(fail(ValueError("batch_size must be at least 1"))) == 2
    assert capsys.readouterr().err == "error: batch_size must be at least 1\n"
    assert error_boundary(fail(FileNotFoundError(2, "No such file or directory", "x.yaml"))) == 2
    assert capsys.readouterr().err == "error: No such file or directory: x.yaml\n"  # not "error: 2"
    assert error_boundary(fail(NonFiniteError("diverged"))) == 1
    assert error_boundary(fail(KeyboardInterrupt())) == 130
    assert "--resume true" in capsys.readouterr().err
    assert error_boundary(fail(ZeroDivisionError("division by zero"))) == 1
    assert "error: ZeroDivisionError: division by zero (set HYDRA_RLHF_DEBUG=1" in capsys.readouterr().err
    monkeypatch.setenv("HYDRA_RLHF_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        error_boundary(fail(ZeroDivisionError("shown with its traceback")))


# ------------------------------------------------------------------------------ the real entry points


def ppo_config(path: Path, tiny_model: str, prompts_file: Path, output: Path, **overrides) -> Path:
    config = {"model_name_or_path": tiny_model, "prompts_path": str(prompts_file), "eval_prompts_path": "",
              "batch_size": 4, "minibatch_size": 4, "max_new_tokens": 4, "max_iterations": 2, "save_every": 1,
              "output_dir": str(output), "lora_r": 4, "seed": 5, **overrides}
    path.write_text(yaml.safe_dump(config))
    return path


def test_recipes_answer_bad_input_in_one_line(tiny_model, prompts_file, tmp_path):
    ppo = [PYTHON, "recipes/ppo.py"]
    config = ppo_config(tmp_path / "ok.yaml", tiny_model, prompts_file, tmp_path / "never")
    one_line_error(run([*ppo, "--config", str(tmp_path / "missing.yaml")], check=False),
                   "No such file or directory", "missing.yaml")
    (tmp_path / "broken.yaml").write_text("batch_size: [4\nmode: hydra\n")
    one_line_error(run([*ppo, "--config", str(tmp_path / "broken.yaml")], check=False), "broken.yaml")
    one_line_error(run([*ppo, "--config", str(config), "--actor_lr", "-0.01"], check=False), "actor_lr must be > 0")
    one_line_error(run([*ppo, "--config", str(config), "--batch_size", "0"], check=False), "batch_size must be at least 1")
    bad_prompts = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "hi"}), "oops"])
    one_line_error(run([*ppo, "--config", str(config), "--prompts_path", str(bad_prompts)], check=False),
                   "bad.jsonl, line 2: not valid JSON")
    one_line_error(run([*ppo, "--config", str(config), "--model_name_or_path", str(tmp_path / "no_model")],
                       check=False), "does not exist")
    one_line_error(run([*ppo, "--config", str(config), "--model_name_or_path", "nobody-here/no-such-model"],
                       check=False), "not a local directory", "hub")
    one_line_error(run([*ppo, "--config", str(config), "--max_prompt_length", "100000"], check=False),
                   "more than", "max_position_embeddings")
    for flag, value, expected in [("--optim", "sgd", "Unknown optim 'sgd'"),  # the memory levers and fusion
                                  ("--adapter_dtype", "int8", "Unknown adapter_dtype 'int8'"),
                                  ("--logprob_chunk_size", "-1", "logprob_chunk_size must be >= 0"),
                                  ("--fusion_tail_fraction", "2", "fusion_tail_fraction must be in (0, 1]"),
                                  ("--max_staleness", "-1", "max_staleness must be >= 0")]:
        one_line_error(run([*ppo, "--config", str(config), flag, value], check=False), expected)
    assert not (tmp_path / "never").exists()  # refused before anything was written
    sft = [PYTHON, "recipes/sft.py", "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path)]
    one_line_error(run([*sft, "--learning_rate", "-1"], check=False), "learning_rate must be > 0")
    one_line_error(run(sft, check=False), "already holds files", "--overwrite_output_dir true")


def test_cli_answers_bad_input_in_one_line(tmp_path):
    result = run([CLI, "evaluate", str(tmp_path), "--num-prompts", "0"], check=False)
    assert result.returncode == 2 and "invalid positive_int value: '0'" in result.stderr
    (tmp_path / "memory.jsonl").write_text("")
    one_line_error(run([CLI, "report", str(tmp_path), "--json", str(tmp_path / "r.json")], check=False),
                   "holds no memory records yet")
    one_line_error(run([CLI, "estimate", "--minibatch-size", "8", "--batch-size", "4"], check=False),
                   "must be a multiple of minibatch_size (8)")
    one_line_error(run([CLI, "profile", "--num-samples-per-prompt", "1", "--objective", "grpo"], check=False),
                   "num_samples_per_prompt must be at least 2, got 1")


def test_resume_skips_a_truncated_checkpoint_and_refuses_other_settings(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "run"
    config = ppo_config(tmp_path / "c.yaml", tiny_model, prompts_file, output)
    run([PYTHON, "recipes/ppo.py", "--config", str(config)])
    newest = output / "checkpoints" / "iter-000002"
    adapter = next(newest.rglob("adapter_model.safetensors"))
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    one_line_error(run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true", "--lora_alpha", "256"],
                       check=False), "cannot resume", "lora_alpha was 32, now 256")
    one_line_error(run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true", "--mode", "lora"],
                       check=False), "mode was 'hydra', now 'lora'")
    resumed = run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true", "--max_iterations", "3"])
    assert "Skipping checkpoint" in resumed.stderr and "adapter_model.safetensors has 100 bytes" in resumed.stderr
    assert "Resumed from" in resumed.stderr and "iter-000001" in resumed.stderr
    metrics = [json.loads(line)["iteration"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 2, 3]  # iteration 2 was redone from the intact checkpoint
    # `hydra-rlhf evaluate` scores what it can, names what it cannot, and still writes its JSON
    adapter = next((output / "checkpoints" / "iter-000001").rglob("adapter_model.safetensors"))
    adapter.write_bytes(b"garbage")
    out = tmp_path / "e.json"
    result = run([CLI, "evaluate", str(output), "--prompts", str(prompts_file), "--num-prompts", "2",
                  "--max-new-tokens", "2", "--json", str(out)], check=False)
    one_line_error(result, "could not score 1 of 3", "iter-000001", code=1)
    scored = json.loads(out.read_text())
    assert sorted(Path(p).name for p in scored if p != "failed") == ["iter-000002", "iter-000003"]
    assert list(scored["failed"]) == [str(output / "checkpoints" / "iter-000001")]


def test_ctrl_c_finishes_the_iteration_saves_and_says_how_to_resume(tiny_model, prompts_file, tmp_path):
    output = tmp_path / "run"
    config = ppo_config(tmp_path / "c.yaml", tiny_model, prompts_file, output, max_iterations=50, save_every=0,
                        max_new_tokens=8)
    process = subprocess.Popen([PYTHON, "recipes/ppo.py", "--config", str(config)], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not (output / "metrics.jsonl").is_file():  # at least one iteration done
        assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "stopped by Ctrl-C after iteration" in line and "--resume true" in line
    done = len((output / "metrics.jsonl").read_text().splitlines())
    assert (output / "checkpoints" / f"iter-{done:06d}").is_dir()  # saved at the iteration it stopped after
    resumed = run([PYTHON, "recipes/ppo.py", "--config", str(config), "--resume", "true",
                   "--max_iterations", str(done + 1)])
    assert f"iteration {done}" in resumed.stderr
    assert torch.load(output / "checkpoints" / f"iter-{done + 1:06d}" / "trainer_state.pt",
                      weights_only=True)["iteration"] == done + 1


@pytest.mark.parametrize("save", [True, False])
def test_save_on_interrupt_decides_whether_ctrl_c_saves(tiny_model, tokenizer, tmp_path, save):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.errors import Interrupted
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.trainer import RLTrainer

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4))
    config = RLConfig(prompts_path="unused", batch_size=4, minibatch_size=4, max_new_tokens=2, save_every=0,
                       output_dir=str(tmp_path), save_on_interrupt=save)
    prompts = [[{"role": "user", "content": f"Tip {i}?"}] for i in range(8)]
    trainer = RLTrainer(model, tokenizer, config, prompts)
    try:
        trainer.step()
        with pytest.raises(Interrupted, match="after iteration 1 of 20") as stopped:
            trainer._stop_after_ctrl_c()  # what the loop calls after the first Ctrl-C
    finally:
        trainer.profiler.close()
    saved = (tmp_path / "checkpoints" / "iter-000001").is_dir()
    assert saved == save
    assert ("--resume true" in str(stopped.value)) == save and ("no checkpoint" in str(stopped.value)) != save
