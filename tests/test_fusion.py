"""Sample-level fusion (hydra_rlhf/experience/fusion.py): the same tokens and scores as generate + the scoring stages, with
finished rows retired from the decode batch and scored in chunks."""

import pytest
import torch

from hydra_rlhf.experience import stages as experience
from hydra_rlhf.experience.fusion import FusionStats, decode, fused_rollout, sample_next
from hydra_rlhf.config import HydraModelConfig


from hydra_rlhf.model.hydra import HydraModel


@pytest.fixture(scope="module")
def varied_model() -> str:
    """A tiny random model whose greedy continuations change token every step (the default tiny model repeats
    one token), so that rows end at different steps."""
    from hydra_rlhf.model.loading import tiny_model_dir

    return str(tiny_model_dir(seed=1, initializer_range=0.5))


def make(model_dir, critic=True):
    return HydraModel.from_config(HydraModelConfig(model_name_or_path=model_dir, mode="hydra"), seed=0, critic=critic)


def prompts(tokenizer):
    enc = tokenizer(["Tell me a joke.", "How do I water a cactus in winter?", "Hi", "Name three colours, please.",
                     "What is a good breakfast?", "Plan a trip"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def frequent_tokens(model, ids, mask, tokenizer, new_tokens):
    """Tokens the tiny random model emits first at different steps in different rows: used as "EOS" so that rows
    end at different lengths (a random model never emits the real EOS)."""
    greedy = model.generate(ids, mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=None)[:, ids.shape[1]:]
    eos = []
    for row, step in zip(range(len(greedy) - 1), range(2, new_tokens, 2)):  # the last row runs to the cap
        token = greedy[row, step].item()
        elsewhere = torch.cat([greedy[:row].flatten(), greedy[row + 1 :].flatten(), greedy[row, :step]])
        if token not in elsewhere.tolist():
            eos.append(token)  # row `row` ends at `step`, no other row is affected
    return eos


def unfused(model, ids, mask, kwargs, eos, temperature):
    rollout = experience.generate(model, ids, mask, kwargs, eos)
    experience.score_frozen(model, rollout, temperature, eos[0])
    experience.score_policy(model, rollout, temperature)
    return rollout


@pytest.mark.parametrize("critic", [True, False])
def test_greedy_fusion_gives_generates_tokens_and_the_stages_scores(varied_model, tokenizer, critic):
    model = make(varied_model, critic)
    ids, mask = prompts(tokenizer)
    eos = frequent_tokens(model, ids, mask, tokenizer, 16)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    reference = unfused(model, ids, mask, kwargs, eos, 0.7)
    stats = FusionStats()
    fused = fused_rollout(model, ids, mask, kwargs, eos, 0.7, eos[0], tail_fraction=0.34, stats=stats)
    lengths = reference.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2, "rows must end at different steps for this test to mean anything"
    assert torch.equal(fused.input_ids, reference.input_ids)  # the same tokens, padded alike
    for name in ("attention_mask", "response_mask", "has_eos"):
        assert torch.equal(getattr(fused, name), getattr(reference, name)), name
    real = reference.response_mask.bool()
    for name in ("ref_logprobs", "logprobs", *(("values",) if critic else ())):
        assert torch.allclose(getattr(fused, name)[real], getattr(reference, name)[real], atol=1e-5), name
    assert torch.allclose(fused.raw_scores, reference.raw_scores, atol=1e-5)
    assert (fused.values is None) == (not critic)
    # retired rows were not computed: decode rows equal live rows, fewer than generate's batch x steps
    assert stats.rows_computed == stats.rows_live == int(lengths.sum())
    assert stats.rows_computed < stats.unfused(reference)["rows_computed"]
    assert stats.scoring_chunks >= 2 and sum(stats.chunk_sizes) == len(ids)
    assert stats.real_positions == int(reference.attention_mask.sum())
    assert stats.scored_positions < stats.unfused(reference)["scored_positions"]  # chunks carry less padding
    assert model.plan["policy"][1] == model.bases["shared"].active_adapter  # the adapter state is restored


def test_decode_retires_every_row_once_and_keeps_groups_adjacent(varied_model, tokenizer):
    model = make(varied_model)
    ids, mask = prompts(tokenizer)
    eos = frequent_tokens(model, ids, mask, tokenizer, 10)
    torch.manual_seed(0)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    fused = fused_rollout(model, ids, mask, kwargs, eos, 1.0, eos[0], samples_per_prompt=2)
    assert fused.input_ids.shape[0] == 2 * len(ids) and fused.group_size == 2
    prompt = fused.input_ids[:, : fused.prompt_len]
    assert torch.equal(prompt[0::2], prompt[1::2]) and torch.equal(prompt[0::2], ids)
    with model.role("policy") as causal_lm:
        retired = [rows for rows, _ in decode(causal_lm, ids, mask, 10, eos, do_sample=True)]
    assert sorted(torch.cat(retired).tolist()) == list(range(len(ids)))


def test_sampling_draws_from_generates_distribution():
    """Temperature then top-p, as generate processes them: the empirical frequencies of 40,000 draws match."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    temperature, top_p = 0.7, 0.9
    probs = torch.softmax(logits[0] / temperature, -1)
    keep = probs.sort(descending=True)
    cumulative = keep.values.cumsum(0)
    kept = keep.indices[: int((cumulative < top_p).sum()) + 1]
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    draws = sample_next(logits.expand(40000, -1), True, temperature, top_p)
    observed = torch.bincount(draws, minlength=len(probs)).float() / len(draws)
    assert torch.allclose(observed, expected, atol=0.01)
    dropped = [i for i in range(len(probs)) if i not in kept.tolist()]
    assert dropped and observed[dropped].sum() == 0  # top-p cut the tail
    assert sample_next(logits, False, temperature, top_p).item() == 0  # greedy: the argmax


def test_a_trimmed_micro_batch_gives_the_same_loss_and_gradients(varied_model, tokenizer):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.objectives import make_objective
    from hydra_rlhf.objectives.functional import RunningMoments

    model = make(varied_model)
    ids, mask = prompts(tokenizer)
    eos = frequent_tokens(model, ids, mask, tokenizer, 12)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    objective = make_objective(RLConfig(batch_size=6, minibatch_size=6))
    targets = objective.targets(fused_rollout(model, ids, mask, kwargs, eos, 1.0, eos[0]), 0.05, RunningMoments())
    batch = targets.batch
    short = batch.response_mask.sum(-1).argsort()[:3]  # the three shortest responses: most columns are padding
    results = []
    for micro in (targets.select(short), targets.select(short).trimmed()):
        model.zero_grad()
        model.train()
        loss = objective.loss(model, micro, micro.batch.response_mask.sum(), _Stats())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]))
    trimmed = batch.select(short).trimmed()
    assert trimmed.input_ids.shape[1] < batch.input_ids.shape[1] and trimmed.padded_fraction() < batch.padded_fraction()
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


class _Stats(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


@pytest.mark.parametrize("objective", ["ppo", "rloo", "grpo", "online_dpo"])
def test_every_objective_trains_with_fusion(tiny_model, tokenizer, prompts_file, tmp_path, objective):
    from hydra_rlhf.config import RLConfig
    from hydra_rlhf.data import load_prompts
    from hydra_rlhf.layout import FUSED_STAGE, objective_info
    from hydra_rlhf.trainer import RLTrainer

    info = objective_info(objective)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=tiny_model, lora_r=4), critic=info.critic)
    config = RLConfig(objective=objective, prompts_path=str(prompts_file), eval_prompts_path=None, batch_size=4,
                       minibatch_size=4, gradient_accumulation_steps=2, max_new_tokens=6, max_iterations=1,
                       save_every=0, save_final=False, output_dir=str(tmp_path), fusion=True)
    trainer = RLTrainer(model, tokenizer, config, load_prompts(str(prompts_file))[0])
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n}
        metrics = trainer.step()
    finally:
        trainer.profiler.close()
    assert metrics["response/count"] == 4 * config.samples_per_prompt
    for key in ("fusion/decode_rows_computed", "fusion/scoring_chunks", "score/padded_fraction", "train/padded_fraction"):
        assert key in metrics, key
    assert metrics["fusion/decode_rows_computed"] == metrics["fusion/decode_rows_live"]
    assert set(trainer.profiler.history[0]) == {FUSED_STAGE, "advantages", "train", "log"}
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # it learned


def test_fusion_benchmark_reports_speed_tokens_and_memory(varied_model, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "fusion.json"
    result = subprocess.run([sys.executable, "benchmarks/fusion.py", "--model", varied_model, "--prompts",
                             "demo:eval", "--batch-size", "4", "--iterations", "1", "--max-new-tokens", "4,6",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["same_tokens"] is True and data["max_score_difference"] < 1e-5
    assert data["speedup"] == data["settings"]["6"]["speedup"] > 0
    for setting in data["settings"].values():
        assert setting["fused"]["decode_rows_computed"] == setting["fused"]["decode_rows_live"]
        assert setting["unfused"]["decode_rows_computed"] >= setting["unfused"]["decode_rows_live"]
        assert setting["peak_bytes"]["fused"] > 0 and setting["peak_bytes"]["unfused"] > 0
    assert "fusion takes" in result.stdout
