"""Hydra-SFT on a tiny model: the recipe, its checkpoint as a PPO base, and bad input."""

import json

import pytest
import torch
from conftest import PYTHON, run


def sft_args(tiny_model, pairs_files, output, *extra):
    train, evaluation = pairs_files
    return [PYTHON, "recipes/sft.py", "--model_name_or_path", tiny_model, "--train_path", str(train),
            "--eval_path", str(evaluation), "--output_dir", str(output), "--lora_r", "4", "--batch_size", "8",
            "--learning_rate", "3e-3", "--head_learning_rate", "3e-2", *extra]


def one_pair() -> dict:
    """One upbeat-vs-gloomy preference row, as load_preferences gives it (conversational messages)."""
    message = lambda role, text: [{"role": role, "content": text}]
    return {"prompt": message("user", "Tell me about item 3."), "chosen": message("assistant", "Great, have fun!"),
            "rejected": message("assistant", "That is sad.")}


@pytest.fixture(scope="module")
def hydra_checkpoint(tiny_model, pairs_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft") / "hydra"
    result = run(sft_args(tiny_model, pairs_files, output, "--num_epochs", "3", "--reward_pooling", "sum"))
    return output, result


def test_hydra_sft_learns_the_preference_and_counts_skips(hydra_checkpoint):
    output, result = hydra_checkpoint
    summary = json.loads((output / "sft_summary.json").read_text())
    assert summary["skipped"] == {"chosen equals rejected": 1, "empty": 1}
    assert summary["train_pairs"] == 48
    assert summary["eval"]["num_pairs"] == 16
    assert summary["eval"]["reward_accuracy"] >= 0.9  # the preference is lexical and easy
    history = [json.loads(line) for line in (output / "sft_history.jsonl").read_text().splitlines()]
    assert history[-1]["lm_loss"] < history[0]["lm_loss"]  # the LM half learns too
    assert "held-out: reward accuracy" in result.stdout
    assert summary["reward_head_fit"]["pairs"] == 48 and summary["reward_head_fit"]["l2"] in (0.01, 0.1, 1.0)


def test_checkpoint_is_the_ppo_base(hydra_checkpoint, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hydra_rlhf.config import HydraModelConfig


    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.model.heads import HEADS_FILE

    output, _ = hydra_checkpoint
    assert not (output / "adapter_config.json").exists()  # LoRA merged: a plain model directory
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(output)))
    saved = load_file(output / HEADS_FILE)
    assert torch.equal(model.reward_head.weight, saved["reward_head.weight"])
    assert torch.equal(model.value_head.weight, saved["reward_head.weight"])
    plain = AutoModelForCausalLM.from_pretrained(output)
    enc = tokenizer(["Tell me about item 3."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, model.bases["shared"].get_base_model()(**enc).logits)
    # A serving engine loads every top-level *.safetensors as the LM's weights: none of them may hold a head.
    from safetensors import safe_open

    for weights in output.glob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as f:
            assert not [k for k in f.keys() if "head" in k and not k.startswith("lm_head")], weights


def test_checkpoints_with_the_heads_at_the_top_still_load(hydra_checkpoint, tmp_path):
    """Checkpoints written before the heads moved to hydra/heads.safetensors keep loading."""
    import shutil

    from hydra_rlhf.config import HydraModelConfig


    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.model.heads import HEADS_FILE, LEGACY_HEADS_FILE

    output, _ = hydra_checkpoint
    legacy = tmp_path / "legacy"
    shutil.copytree(output, legacy)
    shutil.move(legacy / HEADS_FILE, legacy / LEGACY_HEADS_FILE)
    current = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(output)))
    old = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(legacy)))
    assert torch.equal(old.reward_head.weight, current.reward_head.weight) and old.reward_pooling == "sum"


def test_ppo_reads_the_reward_as_hydra_sft_trained_it(hydra_checkpoint, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hydra_rlhf.config import HydraModelConfig

    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.model.heads import HEADS_FILE
    from hydra_rlhf.sft import HydraSFTModel, SFTConfig, collate, encode_pairs

    output, _ = hydra_checkpoint
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(output)))
    assert model.reward_pooling == "sum"  # stored in the heads file's metadata
    trained = HydraSFTModel(AutoModelForCausalLM.from_pretrained(output), model.reward_head.in_features, "sum")
    trained.reward_head.load_state_dict({k.split(".", 1)[1]: v for k, v in load_file(output / HEADS_FILE).items()
                                         if k.startswith("reward_head.")})
    pair = one_pair()
    [row], _ = encode_pairs(tokenizer, [pair], SFTConfig())
    batch = collate([row], tokenizer.pad_token_id)
    with torch.no_grad():
        _, sft_rewards, *_ = trained(**batch)
        ppo_rewards = model.rewards(batch["input_ids"], batch["attention_mask"], len(row["prompt"]))
    assert torch.allclose(sft_rewards, ppo_rewards, atol=1e-5)
    assert sft_rewards[0] > sft_rewards[1]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_sft_gradients(tiny_model, tokenizer, finetune):
    from hydra_rlhf.config import ModelConfig
    from hydra_rlhf.sft import SFTConfig, build_sft_model, collate, encode_pairs, sft_loss

    pair = one_pair()
    rows, _ = encode_pairs(tokenizer, [pair, pair], SFTConfig())
    grads = []
    for checkpointing in (False, True):
        config = SFTConfig(finetune=finetune)
        model = build_sft_model(ModelConfig(model_name_or_path=tiny_model, lora_r=4,
                                            gradient_checkpointing=checkpointing), config, "cpu")
        assert model.lm.is_activation_checkpointing == checkpointing
        model.train()
        loss, *_ = sft_loss(model, collate(rows, tokenizer.pad_token_id), "hydra", 1.0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert len(grads[0]) > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_reward_head_refit_reaches_the_logistic_optimum():
    from hydra_rlhf.model.head_fits import fit_reward_head

    # Pairs whose chosen-minus-rejected features point along one direction, with noise; a few labels flipped.
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=generator)
    rejected = 5 * torch.randn(400, 16, generator=generator)
    signs = torch.where(torch.rand(400, generator=generator) < 0.1, -1.0, 1.0)[:, None]
    chosen = rejected + signs * direction + torch.randn(400, 16, generator=generator)
    head = torch.nn.Linear(16, 1)
    fit = fit_reward_head(head, chosen[:300], rejected[:300])
    with torch.no_grad():
        held_out = (head(chosen[300:]) > head(rejected[300:])).float().mean()
    assert fit["pairs"] == 300 and 0.8 < fit["cv_accuracy"] <= 0.95
    assert held_out >= 0.85  # 10% of labels flipped: ~0.9 is the ceiling
    assert torch.nn.functional.cosine_similarity(head.weight[0], direction, dim=0) > 0.9
    assert head.bias.item() == 0.0


def test_the_critic_start_recovers_a_linear_value():
    """Sequences whose every state reads v + noise, scored direction . v + bias: the ridge fit over all states
    recovers the value function; the last response token and the padding after it (no state) are not read."""
    from hydra_rlhf.model.head_fits import CriticStart

    generator = torch.Generator().manual_seed(0)
    direction, bias = torch.randn(8, generator=generator), 0.7
    per_sequence = torch.randn(40, 1, 8, generator=generator)  # 20 pairs: [chosen; rejected]
    hidden = per_sequence + 0.01 * torch.randn(40, 12, 8, generator=generator)
    labels_mask = torch.zeros(40, 12)
    labels_mask[:, 4:9] = 1  # response tokens 4..8: their states are positions 3..7
    hidden[:, 8:] = 1e3  # what no state reads: the last response token and the padding after it
    scores = (per_sequence[:, 0] @ direction + bias).chunk(2)
    start = CriticStart(8, ridge=1e-8)
    for pairs in (range(10), range(10, 20)):  # two batches of 10 pairs, each [chosen; rejected]
        rows = [*pairs, *(pair + 20 for pair in pairs)]
        start.add(list(pairs), hidden[rows], labels_mask[rows])
    head = torch.nn.Linear(8, 1)
    fit = start.fit(head, lambda pairs: (scores[0][pairs], scores[1][pairs]))
    assert fit["sequences"] == 40 and fit["states"] == 40 * 5 and fit["r2"] > 0.999
    assert torch.allclose(head.weight[0], direction, atol=0.05) and abs(head.bias.item() - bias) < 0.05


def test_refit_on_final_features_covers_the_pairs_the_steps_did_not_reach(tiny_model, pairs_files, tmp_path):
    # a quarter epoch: 2 steps of 8 pairs reach 16 of the 48 training pairs
    fits = {}
    for features in ("training", "final"):
        output = tmp_path / features
        run(sft_args(tiny_model, pairs_files, output, "--num_epochs", "0.25", "--reward_pooling", "sum",
                     "--refit_features", features))
        summary = json.loads((output / "sft_summary.json").read_text())
        assert summary["steps"] == 2
        fits[features] = summary["reward_head_fit"], summary["eval"]["reward_accuracy"]
    assert fits["training"][0]["pairs"] == 16 and fits["training"][0]["features"] == "training"
    assert fits["final"][0]["pairs"] == 48 and fits["final"][0]["features"] == "final"
    assert fits["final"][1] >= 0.9  # the head refit on every pair ranks the easy held-out pairs


def test_plain_objectives(tiny_model, pairs_files, tmp_path):
    for objective in ("sft", "reward"):
        output = tmp_path / objective
        run(sft_args(tiny_model, pairs_files, output, "--sft_objective", objective, "--max_train_pairs", "16"))
        history = [json.loads(line) for line in (output / "sft_history.jsonl").read_text().splitlines()]
        assert len(history) == 2  # 16 pairs / batch 8, one epoch
        assert json.loads((output / "sft_summary.json").read_text())["objective"] == objective


def test_quantized_lora_sft_saves_an_unquantized_merged_model(tiny_model, pairs_files, tmp_path):
    output = tmp_path / "q"
    run(sft_args(tiny_model, pairs_files, output, "--quantization", "4bit", "--max_train_pairs", "8"))
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config


def test_missing_column_is_one_line(tiny_model, pairs_files, tmp_path):
    result = run(sft_args(tiny_model, pairs_files, tmp_path / "x", "--chosen_column", "answer"), check=False)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "column 'answer' not found" in message and "train.jsonl" in message and "'chosen'" in message
    assert "Traceback" not in result.stderr


def test_long_rows_truncated_or_dropped_and_counted(tokenizer, pairs_files):
    from hydra_rlhf.data import load_preferences
    from hydra_rlhf.sft import SFTConfig, encode_pairs

    pairs, _ = load_preferences(str(pairs_files[0]))
    truncated, counts = encode_pairs(tokenizer, pairs, SFTConfig(max_length=18, max_prompt_length=8))
    assert len(truncated) == len(pairs) and counts["chosen over max_length"] > 0 and counts["prompt truncated"] > 0
    assert all(len(r["prompt"]) + len(r["chosen"]) <= 18 for r in truncated)
    dropped, counts = encode_pairs(tokenizer, pairs, SFTConfig(max_length=18, max_prompt_length=8, truncation="drop"))
    # a pair is dropped at its first over-long side, so the two counts add up to the dropped pairs
    assert 0 < len(pairs) - len(dropped) == counts["chosen over max_length"] + counts["rejected over max_length"]


def test_bad_sft_settings():
    from hydra_rlhf.sft import SFTConfig

    with pytest.raises(ValueError, match="hydra, sft, reward"):
        SFTConfig(objective="dpo")
    with pytest.raises(ValueError, match="truncate or drop"):
        SFTConfig(truncation="cut")
    with pytest.raises(ValueError, match="refit_features 'all': use one of training, final"):
        SFTConfig(refit_features="all")
    with pytest.raises(ValueError, match="reward_layer must be >= 0, got -1"):
        SFTConfig(reward_layer=-1)


def test_unknown_yaml_key_names_it(tiny_model, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model_name_or_path: {tiny_model}\nreward_wieght: 2.0\n")
    result = run([PYTHON, "recipes/sft.py", "--config", str(config)], check=False)
    assert result.returncode == 2 and "reward_wieght" in result.stderr and "Traceback" not in result.stderr


def test_near_tie_pairs_are_skipped_and_counted(tmp_path):
    from hydra_rlhf.data import load_preferences

    path = tmp_path / "scored.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "chosen_score": 0.5 + m,
             "rejected_score": 0.5} for i, m in enumerate([0.01, 0.2, 0.05, 0.4])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = load_preferences(str(path), min_score_margin=0.1)
    assert [p["chosen"][0]["content"] for p in pairs] == ["good 1", "good 3"]
    assert skipped == {"score margin below minimum": 2}
    assert len(load_preferences(str(path))[0]) == 4  # off by default
    unscored = tmp_path / "unscored.jsonl"
    unscored.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(KeyError, match="column 'chosen_score' not found"):
        load_preferences(str(unscored), min_score_margin=0.1)


def test_objectives_benchmark_compares_the_three(tiny_model, pairs_files, tmp_path):
    import yaml

    train, evaluation = pairs_files
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": tiny_model, "lora_r": 4, "train_path": str(train),
                                      "eval_path": str(evaluation), "max_train_pairs": 8, "batch_size": 8}))
    result = run([PYTHON, "benchmarks/sft_objectives.py", "--config", str(config), "--output_dir", str(tmp_path / "b")])
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(results) == {"hydra", "sft", "reward"}
    assert results["sft"]["reward_accuracy"] == 0.5  # the plain-SFT head is never trained: all ties
    assert "Hydra-SFT perplexity / plain SFT" in result.stdout


def test_a_reward_head_on_an_inner_layer_is_read_there_by_ppo(tiny_model, pairs_files, tokenizer, tmp_path):
    """reward_layer: Hydra-SFT trains and refits the head on the hidden states after layer 1 (the refit's pass
    stops there), stores the layer with the head, and PPO's reward (hydra: the reference's pass; lora: a reward
    pass of its own) reads the same states. The value head starts as the checkpoint's fitted start (the final
    states regressed on the reward head's scores), not as a copy of a head that reads another layer; from a
    checkpoint without one, at zero."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model import HydraModel
    from hydra_rlhf.model.heads import HEADS_FILE, pool_response, save_heads
    from hydra_rlhf.sft import SFTConfig, collate, encode_pairs

    output = tmp_path / "layer1"
    run(sft_args(tiny_model, pairs_files, output, "--num_epochs", "0.25", "--reward_pooling", "sum",
                 "--reward_layer", "1", "--refit_features", "final"))
    summary = json.loads((output / "sft_summary.json").read_text())
    assert summary["reward_head_fit"]["pairs"] == 48 and summary["eval"]["reward_accuracy"] >= 0.9
    assert summary["value_head_fit"]["sequences"] == 2 * 16 and summary["value_head_fit"]["r2"] > 0.5  # 2 steps of 8
    with safe_open(str(output / HEADS_FILE), framework="pt") as heads:
        assert heads.metadata() == {"reward_pooling": "sum", "reward_layer": "1"}
        value_start = heads.get_tensor("value_head.weight")
    [row], _ = encode_pairs(tokenizer, [one_pair()], SFTConfig())
    batch = collate([row], tokenizer.pad_token_id)
    prompt_len = len(row["prompt"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # the sequences as PPO lays them out: the prompt (no padding here) then the response
    lm = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        inner = lm.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    response = mask.clone()
    response[:, :prompt_len] = 0
    for mode in ("hydra", "lora"):
        model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(output), mode=mode))
        assert model.reward_layer == 1 and torch.equal(model.value_head.weight, value_start) and value_start.any()
        expected = model.reward_head(pool_response(inner, response, "sum")).squeeze(-1)
        with torch.no_grad():
            _, frozen = model.frozen_scores(ids, mask, prompt_len)
            alone = model.rewards(ids, mask, prompt_len)
        assert torch.allclose(frozen, expected, atol=1e-5) and torch.allclose(alone, expected, atol=1e-5)
        assert frozen[0] > frozen[1]  # "Great, have fun!" over "That is sad."
    saved = tmp_path / "rl"
    model.save_pretrained(saved)
    with safe_open(str(saved / HEADS_FILE), framework="pt") as heads:
        assert heads.metadata()["reward_layer"] == "1"  # an RL checkpoint keeps the read too
    save_heads({"reward_head.weight": model.reward_head.weight.detach(), "reward_head.bias": model.reward_head.bias},
               output, "sum", 1)  # a checkpoint written before the value head's start was fitted
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=str(output), mode="hydra"))
    assert not model.value_head.weight.any() and not model.value_head.bias.any()


def test_a_reward_layer_past_the_model_is_one_line(tiny_model, pairs_files, tmp_path):
    result = run(sft_args(tiny_model, pairs_files, tmp_path / "out", "--reward_layer", "99"), check=False)
    assert result.returncode != 0
    assert "reward_layer 99 is outside 0..2" in result.stderr.strip().splitlines()[-1]
