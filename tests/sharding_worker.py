"""PPO iterations on a fixed global batch, under ``torchrun`` (N ranks, each its 1/N of the rows) or plain
``python`` (one process, every row): tests/test_sharding.py compares what they train.

    torchrun --standalone --nproc_per_node 2 tests/sharding_worker.py MODEL OUTPUT --sharding fsdp2
    python tests/sharding_worker.py MODEL OUTPUT

Stage 1 (sampling) is replaced by fixed responses, a function of the iteration only, so one process and N ranks
train on the same global batch; stages 2-6 (the adapters-off pass, the actor's and critic's scores, GAE, the
clipped losses, the optimizer, checkpoints) are the trainer's own. Writes OUTPUT/result-<processes>.pt: the
trained weights gathered whole, the base's bytes on each rank and the frozen base's fingerprint before and after.
"""

import argparse
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

GLOBAL_ROWS, PROMPT, RESPONSE = 8, 6, 6


def fixed_batch(iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask, responses) of the global batch of ``iteration``; a few prompts left-padded."""
    generator = torch.Generator().manual_seed(1000 + iteration)
    prompt_ids = torch.randint(10, 1000, (GLOBAL_ROWS, PROMPT), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[::3, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    return prompt_ids, prompt_mask, torch.randint(10, 1000, (GLOBAL_ROWS, RESPONSE), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--sharding", default="none")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # a short timeout: a rank waiting on a collective the other never joins fails the test fast
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank() if world > 1 else 0

    from hydra_rlhf.config import HydraModelConfig, RLConfig
    from hydra_rlhf.experience import stages
    from hydra_rlhf.memory.profiler import storage_bytes
    from hydra_rlhf.model.hydra import HydraModel
    from hydra_rlhf.model.loading import load_tokenizer
    from hydra_rlhf.model.sharding import trained_state
    from hydra_rlhf.run import make_accelerator
    from hydra_rlhf.trainer import RLTrainer

    rows = GLOBAL_ROWS // world
    config = RLConfig(prompts_path="unused", eval_prompts_path=None, batch_size=rows, minibatch_size=rows,
                      num_epochs=2, max_new_tokens=RESPONSE, stop_at_eos=False, whiten_advantages=False,
                      max_iterations=args.iterations, save_every=1, output_dir=args.output, resume=args.resume,
                      sharding=args.sharding, seed=1, actor_lr=1e-3, critic_lr=1e-3)
    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=args.model, lora_r=4), seed=0)
    prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(GLOBAL_ROWS)]
    trainer = RLTrainer(model, load_tokenizer(args.model), config, prompts, make_accelerator())

    iterations_run = []

    def fixed_generate(model, prompt_ids, prompt_mask, generation_kwargs, eos_token_ids, **kwargs):
        iterations_run.append(trainer.iteration)
        mine = slice(rank * rows, (rank + 1) * rows)
        ids, mask, responses = (t[mine] for t in fixed_batch(trainer.iteration))
        return stages.sampled_rollout(ids, mask, responses, eos_token_ids, 1)

    # the real sampler under sharding, with ranks that stop at different lengths (the early one keeps stepping)
    ids, mask, _ = fixed_batch(0)
    sampled = model.generate(ids[:2], mask[:2], max_new_tokens=3 + 4 * rank, do_sample=True, top_k=0,
                             pad_token_id=0).shape[1] - PROMPT
    stages.generate = fixed_generate
    before = model.frozen_fingerprint()
    trainer.train()
    trainer.profiler.close()
    trained = trained_state(model)
    if trained is None:  # one process: the modules hold the whole weights
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    per_rank = [(storage_bytes(model.base_parameters()), sampled)] * world
    if world > 1:
        dist.all_gather_object(per_rank, per_rank[0])
    result = {"trained": trained, "base_bytes": [b for b, _ in per_rank], "sampled": [n for _, n in per_rank],
              "sharding": trainer.sharding, "frozen_before": before, "frozen_after": model.frozen_fingerprint(),
              "hashes": trainer.trainable_hashes_across_ranks(), "iterations_run": iterations_run}
    if rank == 0:
        torch.save(result, Path(args.output) / f"result-{world}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
