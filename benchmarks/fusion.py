"""Sample-level fusion against generate + the scoring stages, side by side in one run, on this machine.

    python benchmarks/fusion.py --json runs/fusion/fusion.json

The bundled model, hydra mode with a critic (so scoring is the adapters-off pass plus the actor and critic
passes), demo prompts, sampling as in the demo (temperature 1.0, top-p 1.0, EOS ends a response), 16 responses
per iteration. At each ``--max-new-tokens`` (48, the demo, and 128, a longer tail) the two paths alternate over
the same prompt batches and their seconds for generation plus scoring are summed. Sampled tokens differ between
the paths (fusion draws no random numbers for finished rows), so lengths are reported beside the times; then
one greedy batch checks that both give the same tokens and scores within 1e-5, and one batch per path runs under
the live-tensor accounting for the peak memory. ``speedup`` = unfused seconds / fused seconds at the longest
setting; target: fusion takes at least 25% less there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hydra_rlhf.experience import stages as experience
from hydra_rlhf.data import encode_prompts, left_pad, load_prompts
from hydra_rlhf.experience.fusion import FusionStats, fused_rollout
from hydra_rlhf.config import HydraModelConfig
from hydra_rlhf.model.hydra import HydraModel
from hydra_rlhf.memory.profiler import LiveTensorBytes, format_bytes
from hydra_rlhf.model.loading import load_tokenizer
from hydra_rlhf.experience.stages import eos_token_ids

TARGET = 0.25  # at least 25% less time for generation plus scoring at the longest setting


TEMPERATURE = 1.0  # the demo's, in sampling and in the log-probs


def unfused(model, ids, mask, kwargs, eos, pad_eos) -> experience.Rollout:
    model.eval()
    rollout = experience.generate(model, ids, mask, kwargs, eos)
    experience.score_frozen(model, rollout, TEMPERATURE, pad_eos)
    experience.score_policy(model, rollout, TEMPERATURE)
    return rollout


def fused(model, ids, mask, kwargs, eos, pad_eos, tail_fraction, stats=None) -> experience.Rollout:
    return fused_rollout(model, ids, mask, kwargs, eos, TEMPERATURE, pad_eos, tail_fraction, stats=stats)


def peak_bytes(function) -> int:
    with LiveTensorBytes() as meter:
        start = meter.current
        meter.reset_peak()
        function()
        return meter.peak - start


def compare(model, batches, kwargs, eos, pad_eos, tail_fraction, seed) -> dict:
    """Alternate the two paths over the same prompt batches (same seed per batch); sum their seconds."""
    seconds = {"unfused": 0.0, "fused": 0.0}
    lengths = {"unfused": [], "fused": []}
    counts = {"unfused": FusionStats(), "fused": FusionStats()}
    for index, (ids, mask) in enumerate(batches):
        for path in ("unfused", "fused"):
            torch.manual_seed(seed + index)
            started = time.perf_counter()
            if path == "unfused":
                rollout = unfused(model, ids, mask, kwargs, eos, pad_eos)
                baseline = FusionStats.unfused(rollout)
                counts[path].rows_computed += baseline["rows_computed"]
                counts[path].rows_live += baseline["rows_live"]
                counts[path].scored_positions += baseline["scored_positions"]
                counts[path].real_positions += int(rollout.attention_mask.sum())
            else:
                rollout = fused(model, ids, mask, kwargs, eos, pad_eos, tail_fraction, counts[path])
            seconds[path] += time.perf_counter() - started
            lengths[path] += rollout.response_mask.sum(-1).tolist()
    result = {"seconds_per_iteration": {p: s / len(batches) for p, s in seconds.items()},
              "speedup": seconds["unfused"] / seconds["fused"],
              # the paths sample different tokens (and so lengths): the time per response token is their fair ratio
              "response_tokens_per_second": {p: sum(lengths[p]) / seconds[p] for p in seconds},
              "response_length_mean": {p: sum(v) / len(v) for p, v in lengths.items()},
              "cut_at_cap_fraction": {p: sum(n >= kwargs["max_new_tokens"] for n in v) / len(v) for p, v in lengths.items()}}
    for path, stats in counts.items():
        result[path] = {"decode_rows_computed": stats.rows_computed, "decode_rows_live": stats.rows_live,
                        "score_padded_fraction": 1 - stats.real_positions / stats.scored_positions}
    return result


def same_results(model, ids, mask, kwargs, eos, pad_eos, tail_fraction) -> dict:
    greedy = {key: value for key, value in kwargs.items() if key not in ("temperature", "top_p", "top_k")}
    greedy["do_sample"] = False
    reference = unfused(model, ids, mask, greedy, eos, pad_eos)
    candidate = fused(model, ids, mask, greedy, eos, pad_eos, tail_fraction)
    real = reference.response_mask.bool()
    differences = [float((getattr(candidate, name)[real] - getattr(reference, name)[real]).abs().max())
                   for name in ("ref_logprobs", "logprobs", "values")]
    differences.append(float((candidate.raw_scores - reference.raw_scores).abs().max()))
    return {"same_tokens": bool(torch.equal(candidate.input_ids, reference.input_ids)),
            "max_score_difference": max(differences)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="Base or Hydra-SFT checkpoint (default: the bundled "
                        "instruct model; the demo samples from its Hydra-SFT checkpoint, runs/demo/sft).")
    parser.add_argument("--prompts", default="demo:train")
    parser.add_argument("--batch-size", type=int, default=16, help="Responses per iteration (the demo's 16).")
    parser.add_argument("--max-new-tokens", default="48,128", help="Comma-separated response caps.")
    parser.add_argument("--iterations", type=int, default=3, help="Prompt batches per setting and path.")
    parser.add_argument("--tail-fraction", type=float, default=0.2, help="fusion_tail_fraction.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=args.model, mode="hydra"), seed=args.seed)
    eos = eos_token_ids(tokenizer, model)
    prompts, _ = load_prompts(args.prompts)
    encoded, _ = encode_prompts(tokenizer, prompts, 64)
    batches = [left_pad(encoded[i * args.batch_size : (i + 1) * args.batch_size], tokenizer.pad_token_id)
               for i in range(args.iterations)]
    settings = {}
    for cap in (int(c) for c in args.max_new_tokens.split(",")):
        kwargs = dict(max_new_tokens=cap, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        print(f"max_new_tokens {cap}: {args.iterations} batches of {args.batch_size}, unfused and fused ...", flush=True)
        result = compare(model, batches, kwargs, eos, tokenizer.eos_token_id, args.tail_fraction, args.seed)
        result.update(same_results(model, *batches[0], kwargs, eos, tokenizer.eos_token_id, args.tail_fraction))
        torch.manual_seed(args.seed)
        result["peak_bytes"] = {
            "unfused": peak_bytes(lambda: unfused(model, *batches[0], kwargs, eos, tokenizer.eos_token_id)),
            "fused": peak_bytes(lambda: fused(model, *batches[0], kwargs, eos, tokenizer.eos_token_id, args.tail_fraction)),
        }
        settings[str(cap)] = result
        s = result["seconds_per_iteration"]
        print(f"  generation + scoring: unfused {s['unfused']:.1f} s, fused {s['fused']:.1f} s per iteration "
              f"({result['speedup']:.2f}x); mean length {result['response_length_mean']['unfused']:.1f} / "
              f"{result['response_length_mean']['fused']:.1f} tokens; response tokens per second "
              f"{result['response_tokens_per_second']['unfused']:.1f} / {result['response_tokens_per_second']['fused']:.1f}")
        for path in ("unfused", "fused"):
            r = result[path]
            print(f"  {path:8s} decode rows computed {r['decode_rows_computed']:6d} (live {r['decode_rows_live']:6d}), "
                  f"scoring padded share {r['score_padded_fraction']:.0%}, peak {format_bytes(result['peak_bytes'][path])}")
        print(f"  greedy: same tokens {result['same_tokens']}, largest score difference {result['max_score_difference']:.1e}")
    longest = settings[max(settings, key=int)]
    verdict = "met" if 1 - 1 / longest["speedup"] >= TARGET else "MISSED"
    print(f"\nat {max(settings, key=int)} tokens fusion takes {1 - 1 / longest['speedup']:.0%} less time "
          f"(target: at least {TARGET:.0%}: {verdict}); device cpu, {torch.get_num_threads()} threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": args.model, "batch_size": args.batch_size, "iterations": args.iterations,
            "tail_fraction": args.tail_fraction, "threads": torch.get_num_threads(), "settings": settings,
            "speedup": longest["speedup"], "tokens_per_second_ratio": longest["response_tokens_per_second"]["fused"]
            / longest["response_tokens_per_second"]["unfused"], "same_tokens": all(r["same_tokens"] for r in settings.values()),
            "max_score_difference": max(r["max_score_difference"] for r in settings.values()),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
