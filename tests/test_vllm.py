"""generation_backend: vllm. The tests marked ``vllm`` need vLLM (`make test-vllm` installs the CPU build into
.venv-vllm and runs them); the rest hold the errors a user without it, or with a setting it cannot serve, gets."""

import importlib.util
import json

import pytest
import torch
from conftest import LAUNCHERS, PYTHON, run
from test_async import tiny
from test_faults import one_line_error
from test_sft import sft_args

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
OBJECTIVES = ("ppo", "rloo", "grpo", "online_dpo")


# ------------------------------------------------------------------------------- without vLLM, or misused


@pytest.mark.skipif(HAVE_VLLM, reason="checks the error a user without vLLM gets")
def test_without_vllm_the_recipe_says_how_to_install_it(tiny_model, prompts_file, tmp_path):
    result = run([PYTHON, "recipes/ppo.py", "--config", "recipes/configs/ppo_smollm2.yaml", "--generation_backend",
                  "vllm", *tiny(tiny_model, prompts_file, tmp_path / "run")], check=False)
    one_line_error(result, "generation_backend vllm needs the vllm package", "make vllm-cpu", 'hydra-rlhf[vllm]')
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_settings_vllm_cannot_serve_are_refused_with_one_line():
    from hydra_rlhf.config import RLConfig

    with pytest.raises(ValueError, match="Unknown generation_backend 'sglang'"):
        RLConfig(generation_backend="sglang")
    with pytest.raises(ValueError, match="fusion and generation_backend vllm"):
        RLConfig(generation_backend="vllm", fusion=True)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        RLConfig(generation_backend="vllm", vllm_gpu_memory_utilization=1.5)


def test_a_policy_without_an_adapter_cannot_be_served(tiny_model):
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.experience.vllm_engine import policy_adapter

    hydra = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model))
    assert policy_adapter(hydra) == ("shared", "actor")
    full = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, mode="full"), critic=False)
    with pytest.raises(ValueError, match="mode 'full' trains the whole policy"):
        policy_adapter(full)


def test_a_checkpoint_with_its_heads_at_the_top_is_named_with_the_move_that_fixes_it(tiny_model, tmp_path):
    # Written before the heads moved to hydra/heads.safetensors: vLLM would read them as LM weights.
    import shutil

    from safetensors.torch import save_file

    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.model.heads import LEGACY_HEADS_FILE
    from hydra_rlhf.experience.vllm_engine import VLLMEngine

    old = tmp_path / "old-sft"
    shutil.copytree(tiny_model, old)
    save_file({"reward_head.weight": torch.zeros(1, 64), "reward_head.bias": torch.zeros(1)}, old / LEGACY_HEADS_FILE)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(old)))
    with pytest.raises(ValueError, match=r"written before the heads moved to hydra/heads.safetensors.*mkdir .* && mv"):
        VLLMEngine.for_model(model, RLConfig(generation_backend="vllm"), [2], 2)


# ---------------------------------------------------------------------------------------------- with vLLM


def live_engine_processes(grace_seconds: float = 10.0) -> list:
    """vLLM engine processes still running (an exited one may stay a zombie until its parent reaps it; that is not
    running), after waiting up to ``grace_seconds`` for them to end."""
    import time

    import psutil

    def live():
        found = []
        for process in psutil.process_iter(["name", "status"]):
            if (process.info["name"] or "").startswith("VLLM") and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        return found

    deadline = time.monotonic() + grace_seconds
    while live() and time.monotonic() < deadline:
        time.sleep(0.5)
    return live()


@pytest.fixture(scope="module")
def sft_checkpoint(pairs_files, tmp_path_factory):
    """A Hydra-SFT checkpoint of a tiny model vLLM's CPU attention serves (head size 32: it has no kernel for
    the default tiny model's 16)."""
    from hydra_rlhf.model.loading import tiny_model_dir

    output = tmp_path_factory.mktemp("vllm") / "sft"
    run(sft_args(str(tiny_model_dir(seed=0, hidden_size=128)), pairs_files, output, "--num_epochs", "1"))
    return output


@pytest.mark.vllm
def test_hydra_sft_checkpoint_serves_as_a_plain_causal_lm_and_the_engine_follows_the_adapter(sft_checkpoint):
    """The checkpoint loads in vLLM as it is (no head among its weights) and decodes greedily as transformers
    does; the engine serves the actor adapter, its log-probs are the learner's, and a changed adapter reaches it."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import encode_prompts
    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.model.loading import load_tokenizer
    from hydra_rlhf.experience.stages import eos_token_ids
    from hydra_rlhf.experience.vllm_engine import VLLMEngine

    tokenizer = load_tokenizer(str(sft_checkpoint))
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(sft_checkpoint), lora_r=4), critic=False)
    config = RLConfig(objective="rloo", batch_size=2, num_samples_per_prompt=2, minibatch_size=4, max_new_tokens=6,
                       seed=3)
    eos = eos_token_ids(tokenizer, model)
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    from hydra_rlhf.memory.formulas import VLLM_LORA_RANKS

    assert VLLM_LORA_RANKS == get_args(MaxLoRARanks)  # the estimator's copy of vLLM's LoRA slots
    engine = VLLMEngine.for_model(model, config, eos, tokenizer.pad_token_id)
    try:
        encoded, _ = encode_prompts(tokenizer, [[{"role": "user", "content": f"Tell me about item {i}."}]
                                                for i in range(2)], 32)
        # greedy, no adapter: the plain LM, token for token
        plain = AutoModelForCausalLM.from_pretrained(sft_checkpoint, dtype=torch.float32)
        greedy = engine.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded],
                                     SamplingParams(temperature=0, max_tokens=6, stop_token_ids=eos, detokenize=False),
                                     use_tqdm=False)
        for ids, output in zip(encoded, greedy):
            expected = plain.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                      pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            ends = [i for i, token in enumerate(expected) if token in eos]
            assert list(output.outputs[0].token_ids) == expected[: ends[0] + 1 if ends else None]

        ids = torch.tensor([[tokenizer.pad_token_id] * (max(map(len, encoded)) - len(e)) + e for e in encoded])
        mask = (torch.arange(ids.shape[1]) >= torch.tensor([ids.shape[1] - len(e) for e in encoded])[:, None]).long()

        def sample(version, seed):
            engine.load_actor(model, version)
            rollout = engine.generate(ids, mask, 2, seed)
            learner = model.policy_scores(rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                          values=False).logprobs.detach()
            return rollout, (learner - rollout.engine_logprobs).abs()[rollout.response_mask.bool()].max()

        first, gap = sample(0, seed=11)
        assert first.input_ids.shape[0] == 4 and first.group_size == 2 and gap < 1e-4
        assert torch.equal(sample(0, seed=11)[0].input_ids, first.input_ids)  # seeded: reproducible
        assert not torch.equal(sample(0, seed=12)[0].input_ids, first.input_ids)
        with torch.no_grad():  # an update: the actor adapter moves
            for name, param in model.named_parameters():
                if ".actor." in name and "lora_B" in name:
                    param.add_(torch.randn_like(param) * 0.5)
        assert engine.stats["engine/sync_bytes"] > 0
        moved, gap = sample(1, seed=11)
        assert gap < 1e-4  # the engine samples from the updated adapter, not the old one
        assert engine.version == 1 and set(engine.llm.llm_engine.list_loras()) == {2}  # one version held
    finally:
        engine.close()


@pytest.mark.vllm
def test_a_model_vllm_cannot_run_is_one_line_before_training(tiny_model, prompts_file, tmp_path):
    # The default tiny model's attention heads (size 16) have no kernel in vLLM's CPU backend.
    result = run([PYTHON, "recipes/ppo.py", "--config", "recipes/configs/ppo_smollm2.yaml", "--generation_backend",
                  "vllm", *tiny(tiny_model, prompts_file, tmp_path / "run")], check=False)
    # One line of ours (the engine's processes print their own traceback above it: that log says why).
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"vLLM could not serve {tiny_model}" in lines[0], lines
    assert "head_dim=16" in result.stdout + result.stderr  # vLLM logs to stdout, its processes' tracebacks to stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not live_engine_processes()


@pytest.mark.vllm
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_with_vllm_sampling(sft_checkpoint, prompts_file, tmp_path, objective):
    output = tmp_path / objective
    run([PYTHON, "recipes/ppo.py", "--config", f"recipes/configs/{objective}_smollm2.yaml", "--generation_backend",
         "vllm", "--actor_lr", "3e-3", *tiny(str(sft_checkpoint), prompts_file, output)])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    adapter = next((output / "final").glob("*/*/adapter_model.safetensors"))
    for row in metrics:
        assert row["engine/logprob_abs_diff"] < 1e-4  # the engine sampled from the learner's current actor
        assert row["engine/sync_bytes"] == adapter.stat().st_size  # the adapter, never the base
        assert row["engine/start_seconds"] > 0
    # The actor moved away from the reference (its first samples had KL 0), and the engine followed it.
    assert abs(metrics[0]["objective/kl"]) < 1e-5 and abs(metrics[-1]["objective/kl"]) > 1e-3
    memory = [json.loads(line)["stages"] for line in (output / "memory.jsonl").read_text().splitlines()]
    assert all(record["sync"]["engine_bytes"] > 0 and "engine_bytes" in record["train"] for record in memory)


@pytest.mark.vllm
def test_reward_functions_score_the_engines_samples_on_a_plain_base(prompts_file, tmp_path):
    # The verifiable-reward layout: no Hydra-SFT head, a user's function scores what vLLM sampled.
    from hydra_rlhf.model.loading import tiny_model_dir

    rewards = tmp_path / "length.py"
    rewards.write_text("def length_reward(completions, completion_ids, **kwargs):\n"
                       "    return [len(ids) / 10 for ids in completion_ids]\n")
    output = tmp_path / "run"
    run([PYTHON, "recipes/ppo.py", "--config", "recipes/configs/ppo_arithmetic.yaml", "--generation_backend", "vllm",
         "--reward_funcs", f"{rewards}:length_reward", "--reward_weights", "1.0", "--actor_lr", "3e-3",
         *tiny(str(tiny_model_dir(seed=0, hidden_size=128)), prompts_file, output)])
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    for row in metrics:
        assert row["engine/logprob_abs_diff"] < 1e-4
        # The function saw the engine's token ids: its mean is the sampled responses' mean length, over ten.
        assert row["reward/length_reward/mean"] == pytest.approx(row["response/length_mean"] / 10, rel=1e-5)
    assert abs(metrics[-1]["objective/kl"]) > 1e-3


@pytest.mark.vllm
def test_async_generation_samples_with_the_engine_of_its_version(sft_checkpoint, prompts_file, tmp_path):
    # The generator (a child process, or rank 1 of two) starts its own engine and gives it each adapter version
    # it samples with; both layouts make the same run, and no engine process outlives it.
    runs = {}
    for name, launcher in LAUNCHERS.items():
        output = tmp_path / name
        run([*launcher, "recipes/ppo.py", "--config", "recipes/configs/ppo_smollm2.yaml", "--generation_backend",
             "vllm", "--async_generation", "true", "--max_staleness", "1", "--actor_lr", "3e-3",
             *tiny(str(sft_checkpoint), prompts_file, output)], env={"OMP_NUM_THREADS": "1"}, timeout=300)
        runs[name] = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert [m["async/policy_version"] for m in runs[name]] == [0, 0, 1]
        assert all(m["engine/logprob_abs_diff"] < 1e-4 for m in runs[name])
        assert abs(runs[name][-1]["objective/kl"]) > 1e-3  # sampled by the updated actor
        assert not live_engine_processes()
    for one, two in zip(runs["one"], runs["two"], strict=True):
        for key in ("objective/reward", "objective/kl", "engine/logprob_abs_diff"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


@pytest.mark.vllm
def test_the_benchmark_compares_the_two_samplers_on_one_checkpoint(sft_checkpoint, prompts_file, tmp_path):
    out = tmp_path / "vllm.json"
    rl = {"lora_layers": 1, "max_iterations": 2, "stop_at_kl": "None", "max_new_tokens": 4, "num_eval_prompts": 4,
          "save_every": 0, "prompts_path": prompts_file, "eval_prompts_path": prompts_file, "actor_lr": 3e-3}
    result = run([PYTHON, "benchmarks/vllm_engine.py", "--sft", str(sft_checkpoint), "--output_dir", str(tmp_path),
                  "--json", str(out), *[f for k, v in rl.items() for f in ("--set", f"{k}={v}")]])
    assert "sampling speed-up (hf / vllm)" in result.stdout
    data = json.loads(out.read_text())
    hf, vllm = data["runs"]["hf"], data["runs"]["vllm"]
    assert hf["iterations"] == vllm["iterations"] == 2
    assert data["generate_speedup"] == pytest.approx(hf["generate_seconds_per_iteration"]
                                                     / vllm["generate_seconds_per_iteration"])
    assert data["gold_gain_difference"] == pytest.approx(vllm["gold_gain"] - hf["gold_gain"])
    adapter = next((tmp_path / "vllm" / "final").glob("*/*/adapter_model.safetensors"))
    assert data["sync_bytes"] == adapter.stat().st_size and data["engine_start_seconds"] > 0
    assert vllm["logprob_abs_diff"] < 1e-4 and vllm["engine_memory_bytes"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "hf" / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("engine/") for key in metrics[0])  # the hf run had no engine


@pytest.mark.vllm
def test_the_demo_samples_with_vllm(prompts_file, pairs_files, tmp_path):
    import yaml

    from hydra_rlhf.model.loading import tiny_model_dir

    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir(seed=0, hidden_size=128)), "lora_r": 4,
        "train_path": str(pairs_files[0]), "eval_path": str(pairs_files[1]), "max_train_pairs": 16, "batch_size": 8}))
    ppo = tmp_path / "ppo.yaml"
    ppo.write_text(yaml.safe_dump({
        "model_name_or_path": "replaced-by-the-demo", "mode": "hydra", "lora_r": 4, "prompts_path": str(prompts_file),
        "eval_prompts_path": str(prompts_file), "num_eval_prompts": 6, "batch_size": 4, "minibatch_size": 4,
        "max_new_tokens": 6, "max_iterations": 2, "save_every": 0}))
    output = tmp_path / "demo"
    result = run([PYTHON, "recipes/demo.py", "--sft_config", str(sft), "--ppo_config", str(ppo), "--output_dir",
                  str(output), "--generation_backend", "vllm"])
    assert "win-rate vs SFT" in result.stdout and "+ engine" in result.stdout  # the memory table shows the engine
    summary = json.loads((output / "summary.json").read_text())
    assert summary["generation_backend"] == "vllm" and summary["ppo_iterations"] == 2
    assert summary["memory"]["generate"]["engine_bytes"] > 0
    metrics = [json.loads(line) for line in (output / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["engine/logprob_abs_diff"] < 1e-4 for m in metrics)
