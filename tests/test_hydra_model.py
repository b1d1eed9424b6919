"""HydraModel invariants, in every mode, on a tiny random model (docs/design.md, "The four modes")."""

import json
from pathlib import Path

import pytest
import torch

from hydra_rlhf.config import HydraModelConfig


from hydra_rlhf.layout import MODES


from hydra_rlhf.model.hydra import HydraModel

EXPECTED_COPIES = {"full": 4, "lora": 2, "j-hydra": 1, "hydra": 1}


def make(tiny_model, mode, **kwargs):
    return HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, mode=mode, **kwargs), seed=0)


def sample_batch(model, tokenizer, new_tokens=6):
    enc = tokenizer(["Tell me a joke.", "How do I water a cactus in winter?"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    seq = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=new_tokens, do_sample=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    prompt_len = enc.input_ids.shape[1]
    mask = torch.cat([enc.attention_mask, torch.ones_like(seq[:, prompt_len:])], dim=1)
    return seq, mask, prompt_len


def train_step(model, seq, mask, prompt_len, steps=2):
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        scores = model.policy_scores(seq, mask, prompt_len, values=True)
        (scores.logprobs.mean() + (scores.values**2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("mode", MODES)
def test_mode_invariants(tiny_model, tokenizer, mode):
    from transformers import AutoModelForCausalLM

    model = make(tiny_model, mode)
    seq, mask, prompt_len = sample_batch(model, tokenizer)

    # base copies, counted from distinct parameter storages
    assert model.base_copies() == EXPECTED_COPIES[mode]

    # reference log-probs equal the plain base model's
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        logits = plain(seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(logits[:, prompt_len - 1 : -1], -1).gather(-1, seq[:, prompt_len:, None]).squeeze(-1)
    ref_logprobs, rewards = model.frozen_scores(seq, mask, prompt_len)
    assert torch.allclose(ref_logprobs, expected, atol=1e-5)

    # the fused frozen pass equals separate passes
    assert torch.allclose(rewards, model.rewards(seq, mask, prompt_len), atol=1e-6)
    assert not ref_logprobs.requires_grad and not rewards.requires_grad

    # train actor and critic; every trainable parameter changes, nothing frozen does
    fingerprint = model.frozen_fingerprint()
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_step(model, seq, mask, prompt_len)
    for name, param in model.named_parameters():
        if name in trainable_before:
            assert not torch.equal(param, trainable_before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, frozen_before[name]), f"frozen {name} changed"
    assert model.frozen_fingerprint() == fingerprint
    # after training the policy differs from the reference, and the reference still equals the plain base
    logprobs = model.policy_scores(seq, mask, prompt_len).logprobs
    assert not torch.allclose(logprobs, ref_logprobs)
    assert torch.allclose(model.frozen_scores(seq, mask, prompt_len)[0], expected, atol=1e-5)


def test_trainable_sets_per_mode(tiny_model):
    hydra, jhydra = make(tiny_model, "hydra"), make(tiny_model, "j-hydra")
    groups = hydra.parameter_groups()
    assert groups["actor"] and all(".actor." in n for n, p in hydra.named_parameters() if any(p is q for q in groups["actor"]))
    # hydra has two adapters, j-hydra one shared: twice the LoRA parameters
    lora_count = lambda m: sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)  # noqa: E731
    assert lora_count(hydra) == 2 * lora_count(jhydra)
    assert all("bias" not in n or "lora" not in n for n, _ in hydra.named_parameters())  # bias="none"


def test_role_restores_adapter_on_exception(tiny_model):
    model = make(tiny_model, "hydra")
    peft_model = model.bases["shared"]
    active = peft_model.active_adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(RuntimeError, match="boom"):
        with model.role("critic"):
            assert peft_model.active_adapter == "critic"
            raise RuntimeError("boom")
    assert peft_model.active_adapter == active
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(RuntimeError, match="boom"):
        with model.role("reference"):
            assert not torch.is_grad_enabled()
            raise RuntimeError("boom")
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="Unknown role"):
        with model.role("judge"):
            pass


def test_frozen_roles_never_get_gradients(tiny_model, tokenizer):
    model = make(tiny_model, "hydra")
    seq, mask, prompt_len = sample_batch(model, tokenizer)
    ref_logprobs, rewards = model.frozen_scores(seq, mask, prompt_len)
    scores = model.policy_scores(seq, mask, prompt_len, values=True)
    (scores.logprobs.sum() + scores.values.sum()).backward()
    assert model.reward_head.weight.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and "value_head" not in n)


@pytest.mark.parametrize("mode", MODES)
def test_save_and_load_reproduce_outputs(tiny_model, tokenizer, tmp_path, mode, caplog):
    model = make(tiny_model, mode)
    assert "the reward head is untrained" in caplog.text  # the tiny base has no Hydra-SFT head
    seq, mask, prompt_len = sample_batch(model, tokenizer)
    train_step(model, seq, mask, prompt_len, steps=1)
    model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "hydra_manifest.json").read_text())
    assert Path(manifest["config"]["model_name_or_path"]).is_absolute()  # loads from any working directory
    caplog.clear()
    loaded = HydraModel.from_pretrained(tmp_path)
    assert "untrained" not in caplog.text  # the heads come from the checkpoint, not the base: nothing to warn about
    for a, b in zip(model.frozen_scores(seq, mask, prompt_len), loaded.frozen_scores(seq, mask, prompt_len)):
        assert torch.equal(a, b)
    ours, theirs = (m.policy_scores(seq, mask, prompt_len, values=True) for m in (model, loaded))
    assert torch.equal(ours.logprobs, theirs.logprobs) and torch.equal(ours.values, theirs.values)


def test_saved_adapter_loads_with_plain_peft(tiny_model, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = make(tiny_model, "hydra")
    seq, mask, prompt_len = sample_batch(model, tokenizer)
    train_step(model, seq, mask, prompt_len, steps=1)
    model.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    actor = PeftModel.from_pretrained(base, tmp_path / "shared" / "actor")
    with torch.no_grad():
        logits = actor(seq, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    peft_logprobs = torch.log_softmax(logits[:, prompt_len - 1 : -1], -1).gather(-1, seq[:, prompt_len:, None]).squeeze(-1)
    with torch.no_grad():
        ours = model.policy_scores(seq, mask, prompt_len).logprobs
    assert torch.allclose(peft_logprobs, ours, atol=1e-5)


def test_value_head_starts_as_reward_head(tiny_model):
    model = make(tiny_model, "hydra")
    assert torch.equal(model.value_head.weight, model.reward_head.weight)
    assert model.value_head.weight.requires_grad and not model.reward_head.weight.requires_grad


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_base_on_cpu(tiny_model, tokenizer, quantization):
    model = make(tiny_model, "hydra", quantization=quantization)
    seq, mask, prompt_len = sample_batch(model, tokenizer, new_tokens=4)
    fingerprint = model.frozen_fingerprint()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ref_logprobs, _ = model.frozen_scores(seq, mask, prompt_len)
    train_step(model, seq, mask, prompt_len)
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged
    assert model.frozen_fingerprint() == fingerprint
    assert torch.equal(model.frozen_scores(seq, mask, prompt_len)[0], ref_logprobs)
    assert model.base_copies() == 1


def test_a_4bit_base_stays_differentiable_after_sampling(tiny_model, tokenizer):
    """bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit weight for an inference kernel at its first forward in
    eval mode without gradients, and then takes that kernel in training too, where it has no backward: every
    adapter whose gradient passes through a frozen 4-bit layer learned nothing. Sampling must not change training."""
    model = make(tiny_model, "hydra", quantization="4bit")
    assert not any(getattr(module, "support_avx512bf16_for_cpu", False) for module in model.modules())
    enc = tokenizer(["Tell me a joke.", "How do I water a cactus in winter?"], return_tensors="pt", padding=True)
    seq, mask, prompt_len = enc.input_ids, enc.attention_mask, enc.input_ids.shape[1] - 3

    def gradients():
        model.train()
        model.zero_grad()
        model.policy_scores(seq, mask, prompt_len, values=True).logprobs.mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for adapter in ("actor", "critic"):  # a non-zero LoRA B, so the A matrices get gradients too
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}" in name:
                torch.nn.init.normal_(param.data, std=0.02)
    fresh = gradients()
    sample_batch(model, tokenizer, new_tokens=3)  # eval mode, no gradients: the forward that repacked the weights
    model.frozen_scores(seq, mask, prompt_len)
    after = gradients()
    lowest_query = next(n for n in fresh if "layers.0." in n and "q_proj.lora_A" in n)
    assert fresh[lowest_query].abs().max() > 0
    assert set(after) == set(fresh)
    assert max(float((after[n] - fresh[n]).abs().max()) for n in fresh) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, tokenizer, mode):
    # hydra is the hard case: the critic's layers are recomputed in backward after the actor adapter is back on
    grads = []
    for checkpointing in (False, True):
        model = make(tiny_model, mode, gradient_checkpointing=checkpointing)
        seq, mask, prompt_len = sample_batch(model, tokenizer)
        model.train()
        scores = model.policy_scores(seq, mask, prompt_len, values=True)
        (scores.logprobs.mean() + scores.values.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_configs_get_one_line_errors():
    with pytest.raises(ValueError, match="Unknown mode 'turbo': use one of full, lora, j-hydra, hydra"):
        HydraModelConfig(mode="turbo")
    with pytest.raises(ValueError, match="mode 'full' trains every weight"):
        HydraModelConfig(mode="full", quantization="4bit")
    with pytest.raises(ValueError, match="Unknown quantization .3bit.: use one of none, 8bit, 4bit"):
        HydraModelConfig(quantization="3bit")


def test_lora_on_top_layers_only(tiny_model, tokenizer):
    model = make(tiny_model, "hydra", lora_layers=1)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(".layers.1." in n for n in lora_names)
    seq, mask, prompt_len = sample_batch(model, tokenizer)
    train_step(model, seq, mask, prompt_len)  # still trains, the base still frozen
    with pytest.raises(ValueError, match="lora_layers must be between 1 and 2"):
        make(tiny_model, "hydra", lora_layers=3)


def test_reward_is_read_at_an_eos_like_in_hydra_sft(tiny_model, tokenizer):
    # Hydra-SFT appends EOS to every response, cut-off ones included: score_frozen must read the reward head at
    # an EOS too, without changing the reference log-probs of the tokens the policy actually sampled.
    from hydra_rlhf.experience.rollout import Rollout
    from hydra_rlhf.experience.stages import score_frozen

    model = make(tiny_model, "hydra")
    seq, mask, prompt_len = sample_batch(model, tokenizer)
    eos = tokenizer.eos_token_id
    seq[1, -2], seq[1, -1], mask[1, -1] = eos, tokenizer.pad_token_id, 0  # row 1 ended on its own; row 0 was cut off
    responses = mask[:, prompt_len:]
    rollout = Rollout(input_ids=seq, attention_mask=mask, response_mask=responses,
                      has_eos=torch.tensor([False, True]), prompt_len=prompt_len)
    score_frozen(model, rollout, 1.0, eos)

    ref_logprobs, _ = model.frozen_scores(seq, mask, prompt_len)
    assert rollout.ref_logprobs.shape == ref_logprobs.shape
    assert torch.allclose(rollout.ref_logprobs * responses, ref_logprobs * responses, atol=1e-5)
    closed = torch.cat([seq[:1], torch.tensor([[eos]])], 1)  # row 0 with the EOS that Hydra-SFT would append
    closed_mask = torch.cat([mask[:1], torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert torch.allclose(rollout.raw_scores[0], model.rewards(closed, closed_mask, prompt_len)[0], atol=1e-5)
    assert torch.allclose(rollout.raw_scores[1], model.rewards(seq[1:], mask[1:], prompt_len)[0], atol=1e-5)
    assert not torch.allclose(rollout.raw_scores[0], model.rewards(seq[:1], mask[:1], prompt_len)[0])  # not at the cut


def test_reward_pooling_reads_the_response():
    from hydra_rlhf.model.heads import pool_response

    hidden = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    response_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    assert torch.equal(pool_response(hidden, response_mask, "last"), hidden[[0, 1], [3, 2]])
    assert torch.equal(pool_response(hidden, response_mask, "mean"), torch.stack([hidden[0, 1:4].mean(0), hidden[1, 2]]))
    assert torch.equal(pool_response(hidden, response_mask, "sum"), torch.stack([hidden[0, 1:4].sum(0), hidden[1, 2]]))
    with pytest.raises(ValueError, match="last, mean, sum"):
        pool_response(hidden, response_mask, "max")



@pytest.mark.parametrize("layer", [0, 1])
def test_reading_layer_captures_an_inner_layer_and_stops_there(tiny_model, tokenizer, layer):
    from transformers import AutoModelForCausalLM

    from hydra_rlhf.model.heads import reading_layer

    decoder = AutoModelForCausalLM.from_pretrained(tiny_model).get_decoder()
    ids = torch.tensor([tokenizer("Have a lovely day!")["input_ids"]])
    expected = decoder(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    calls = []
    decoder.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    with reading_layer(decoder, layer) as read:
        final = decoder(input_ids=ids).last_hidden_state
    assert torch.equal(read["hidden"], expected) and len(calls) == 1 and not torch.equal(final, expected)
    with reading_layer(decoder, layer, stop=True) as read:
        decoder(input_ids=ids)
        calls.append("the block went on after the stop")
    assert torch.equal(read["hidden"], expected) and len(calls) == 1  # the last layer never ran
    with reading_layer(decoder, None, stop=True) as read:
        decoder(input_ids=ids)
    assert read == {} and len(calls) == 2  # no layer: the whole forward, nothing captured


def test_a_reward_layer_out_of_range_is_one_line():
    from hydra_rlhf.model.heads import check_reward_layer

    check_reward_layer(None, 4, "x")
    check_reward_layer(4, 4, "x")  # the last layer's output, before the final norm
    with pytest.raises(ValueError, match=r"ckpt/hydra/heads.safetensors: reward_layer 5 is outside 0..4"):
        check_reward_layer(5, 4, "ckpt/hydra/heads.safetensors")


def test_one_lookup_finds_the_decoder_layers_through_every_wrapper(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hydra_rlhf.model.loading import decoder_layers, unwrapped

    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    layers = causal_lm.model.layers
    wrapped = get_peft_model(causal_lm, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrapped(wrapped) is causal_lm and unwrapped(causal_lm) is causal_lm
    for model in (causal_lm, causal_lm.get_decoder(), wrapped):  # the causal LM, its decoder, a peft wrapper
        assert decoder_layers(model, "reward_layer") is layers
    causal_lm.model.layers = torch.nn.Sequential(*layers)  # a decoder without a `layers` list
    with pytest.raises(ValueError, match=r"^lora_layers: LlamaModel keeps no `layers` list .* without lora_layers\.$"):
        decoder_layers(wrapped, "lora_layers")
