"""Memory levers (hydra_rlhf/memory/levers.py): each gives the results of the path without it, and cuts what it claims."""

from contextlib import nullcontext

import pytest
import torch

from hydra_rlhf.config import HydraModelConfig

from hydra_rlhf.model.hydra import HydraModel
from hydra_rlhf.memory.levers import make_optimizer, response_logprobs
from hydra_rlhf.memory.profiler import LiveTensorBytes


def make(tiny_model, mode="hydra", **kwargs):
    return HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, mode=mode, **kwargs), seed=0)


def batch(tokenizer, rows=3, new_tokens=9):
    """Left-padded prompts followed by random response tokens (a response of width ``new_tokens``)."""
    enc = tokenizer(["Tell me a joke.", "How do I water a cactus in winter?", "Hi"][:rows], return_tensors="pt",
                    padding=True)
    generator = torch.Generator().manual_seed(0)
    response = torch.randint(0, len(tokenizer), (rows, new_tokens), generator=generator)
    seq = torch.cat([enc.input_ids, response], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones_like(response)], dim=1)
    return seq, mask, enc.input_ids.shape[1]


def scores_and_gradients(model, seq, mask, prompt_len):
    model.train()
    scores = model.policy_scores(seq, mask, prompt_len, temperature=0.7, entropy=True,
                                 values=model.has_critic)
    loss = scores.logprobs.mean() + (scores.values.mean() if model.has_critic else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    frozen = model.frozen_scores(seq, mask, prompt_len, temperature=0.7)
    return scores, grads, frozen


@pytest.mark.parametrize(("mode", "checkpointing"), [("hydra", False), ("hydra", True), ("full", False)])
def test_chunked_logprobs_equal_whole_logits(tiny_model, tokenizer, mode, checkpointing):
    # chunks of 4 tokens do not divide the 3 x 9 response tokens, and cut across rows
    seq, mask, prompt_len = batch(tokenizer)
    results = [scores_and_gradients(make(tiny_model, mode, gradient_checkpointing=checkpointing,
                                         logprob_chunk_size=chunk), seq, mask, prompt_len) for chunk in (0, 4)]
    (whole, whole_grads, whole_frozen), (chunked, chunked_grads, chunked_frozen) = results
    for name in ("logprobs", "entropy", "values"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), atol=1e-5), name
    assert chunked.logprobs.requires_grad and not chunked.entropy.requires_grad
    assert whole_grads.keys() == chunked_grads.keys() and len(whole_grads) > 2
    for name, grad in whole_grads.items():
        assert torch.allclose(grad, chunked_grads[name], atol=1e-5), name
    if mode == "full":  # the trainable LM head gets its gradient through the recomputed chunks
        assert any("lm_head" in name or "embed_tokens" in name for name in chunked_grads)
    assert torch.allclose(whole_frozen[0], chunked_frozen[0], atol=1e-5)
    assert torch.equal(whole_frozen[1], chunked_frozen[1])


def peak_bytes(function) -> int:
    with LiveTensorBytes() as meter:
        meter.reset_peak()
        start = meter.current
        function()
        return meter.peak - start


def test_chunked_logprobs_never_hold_whole_logits():
    """Whole logits: the peak grows with the batch (4 copies of the logits in backward). Chunked: a few copies of
    one chunk's logits, whatever the batch."""
    torch.manual_seed(0)
    width, hidden, vocab, chunk = 64, 32, 32768, 64
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    chunk_logits, weight_grad = 4 * chunk * vocab, 4 * hidden * vocab

    def train_peak(rows, chunk_size):
        states = torch.randn(rows, width, hidden, requires_grad=True)
        tokens = torch.randint(0, vocab, (rows, width))
        logprobs, _ = response_logprobs(lm_head, states, tokens, 1.0, entropy=True, chunk_size=chunk_size)
        return peak_bytes(lambda: logprobs.sum().backward()), peak_bytes(
            lambda: response_logprobs(lm_head, states, tokens, 1.0, entropy=True, chunk_size=chunk_size)[0].sum().backward())

    for rows in (8, 16):
        logits = 4 * rows * width * vocab
        assert train_peak(rows, 0)[1] > 3 * logits
        backward_only, forward_and_backward = train_peak(rows, chunk)
        assert forward_and_backward < 5 * chunk_logits + weight_grad  # 40 MiB against 256 (8 rows) or 512 MiB
        assert backward_only < 5 * chunk_logits + weight_grad  # backward recomputes one chunk at a time
    with torch.no_grad():  # scoring: the same cut without a graph
        states, tokens = torch.randn(16, width, hidden), torch.randint(0, vocab, (16, width))
        assert peak_bytes(lambda: response_logprobs(lm_head, states, tokens, 1.0, True, chunk)) < 5 * chunk_logits


def test_8bit_adamw_keeps_one_byte_states_and_trains(tiny_model, tokenizer):
    model = make(tiny_model, logprob_chunk_size=16, lora_r=64)  # 64 x 64 adapters: 8-bit states from 4,096 elements
    seq, mask, prompt_len = batch(tokenizer)
    groups = model.parameter_groups()
    optimizer = make_optimizer([{"params": params, "lr": 1e-2} for params in groups.values()], "adamw_bnb_8bit", 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):  # lora_A moves from the second step on (lora_B starts at zero)
        scores = model.policy_scores(seq, mask, prompt_len, values=True)
        (scores.logprobs.mean() + scores.values.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    big = [p for p in model.trainable_parameters() if p.numel() >= 4096]
    small = [p for p in model.trainable_parameters() if p.numel() < 4096]
    assert big and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in big)
    assert all(optimizer.state[p]["state1"].dtype == torch.float32 for p in small)  # bitsandbytes' min_8bit_size
    with pytest.raises(ValueError, match="Unknown optim 'sgd'"):
        make_optimizer([{"params": big}], "sgd", 0.0)


def test_adapters_in_the_compute_dtype(tiny_model, tokenizer):
    model = make(tiny_model, dtype="bfloat16", adapter_dtype="compute")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)
    assert model.reward_head.weight.dtype == model.value_head.weight.dtype == torch.float32  # heads stay fp32
    seq, mask, prompt_len = batch(tokenizer)
    scores = model.policy_scores(seq, mask, prompt_len, values=True)
    (scores.logprobs.mean() + scores.values.mean()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora)
    default = make(tiny_model, dtype="bfloat16")  # peft's default: fp32 adapters on a bf16 base
    assert all(p.dtype == torch.float32 for n, p in default.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="float16 base"):
        make(tiny_model, dtype="float16", adapter_dtype="compute")
    with pytest.raises(ValueError, match="Unknown adapter_dtype 'int8'"):
        HydraModelConfig(adapter_dtype="int8")


def test_activation_offload_moves_the_checkpointed_inputs_and_keeps_gradients(tiny_model, tokenizer, monkeypatch):
    """On CPU the lever is a no-op; force its hooks on to check what it packs and that backward is unchanged."""
    import hydra_rlhf.model.hydra as hydra_model

    packed = []

    class CountingOffload(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self):
            def pack(tensor):
                packed.append(tuple(tensor.shape))
                return tensor.to("cpu", copy=True)  # what save_on_cpu does on CUDA: a host copy
            super().__init__(pack, lambda tensor: tensor)

    monkeypatch.setattr(hydra_model, "activation_offload",
                        lambda enabled, device: CountingOffload() if enabled else nullcontext())
    seq, mask, prompt_len = batch(tokenizer)
    grads = []
    for offload in (False, True):
        model = make(tiny_model, gradient_checkpointing=True, activation_offload=offload, logprob_chunk_size=8)
        _, gradients, _ = scores_and_gradients(model, seq, mask, prompt_len)
        grads.append(gradients)
    hidden = model.reward_head.in_features
    layer_inputs = [shape for shape in packed if shape == (*seq.shape, hidden)]
    assert len(layer_inputs) >= 2 * 2  # each of the 2 layers' inputs, in the actor's and the critic's forward
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_a_run_with_every_cpu_lever_resumes_bit_identically(tiny_model, tokenizer, prompts_file, tmp_path):
    """8-bit AdamW states go through the checkpoint (torch.load weights_only) and come back exact."""
    import bitsandbytes

    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.trainer import RLTrainer

    prompts = load_prompts(str(prompts_file))[0]

    def trainer(output, resume=False):
        model = make(tiny_model, lora_r=64, gradient_checkpointing=True, logprob_chunk_size=8)
        config = RLConfig(prompts_path=str(prompts_file), eval_prompts_path=None, batch_size=4, minibatch_size=2,
                           max_new_tokens=6, max_iterations=3, save_every=1, output_dir=str(output),
                           optim="adamw_bnb_8bit", resume=resume, seed=3)
        return RLTrainer(model, tokenizer, config, prompts)

    straight = trainer(tmp_path / "straight")
    straight.train()
    interrupted = trainer(tmp_path / "resumed")
    interrupted.step()  # iteration 1, checkpointed; the process "dies" here
    interrupted.profiler.close()
    resumed = trainer(tmp_path / "resumed", resume=True)
    resumed.train()
    for trained in (straight, resumed):
        trained.profiler.close()
        assert isinstance(trained.optimizer, bitsandbytes.optim.AdamW8bit)
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = dict(resumed.model.named_parameters())
    assert a and all(torch.equal(p, b[n]) for n, p in a.items())


def test_the_readme_command_with_levers_and_fusion_runs(tiny_model, prompts_file, tmp_path):
    # README, Usage: `python recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --logprob_chunk_size 256
    # --optim adamw_bnb_8bit --fusion true`, shrunk to the tiny model and one short iteration
    import json

    from conftest import PYTHON, run

    output = tmp_path / "run"
    run([PYTHON, "recipes/ppo.py", "--config", "recipes/configs/ppo_smollm2.yaml", "--logprob_chunk_size", "256",
         "--optim", "adamw_bnb_8bit", "--fusion", "true", "--model_name_or_path", tiny_model, "--lora_layers", "1",
         "--prompts_path", str(prompts_file), "--eval_prompts_path", "", "--max_iterations", "1",
         "--max_new_tokens", "4", "--save_every", "0", "--output_dir", str(output)])
    summary = json.loads((output / "summary.json").read_text())
    assert "generate+score" in summary["memory"] and "score/padded_fraction" in summary["final_metrics"]
