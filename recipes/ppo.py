"""Hydra-PPO: PPO on one LoRA-wrapped base that is policy, reference, reward model and critic.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    python recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --mode lora --max_iterations 2
    python recipes/ppo.py --config recipes/configs/online_dpo_smollm2.yaml --async_generation true
    accelerate launch --multi_gpu --num_processes 2 recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --async_generation true
    torchrun --standalone --nproc_per_node 2 recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --sharding fsdp2
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml

Two processes work on a CPU-only machine too: `--multi_gpu` only selects accelerate's torchrun launcher
(`--cpu` would force a single process); each process then runs on CPU with gloo, and FSDP2 averages the
gradients across them. With `--sharding fsdp2` (or the accelerate FSDP2 config) each process holds 1/N of the
base instead of a replica (docs/sharding.md). With `--async_generation true`, two processes are a learner (rank 0) and a
generator (rank 1) instead; on one process the generator is a child process sharing the base.

Every field of HydraModelConfig and RLConfig is a YAML key and a --flag (flags override the YAML);
`python recipes/ppo.py --help` lists them with their help.
"""

import sys

from hydra_rlhf.config import RLConfig, run_recipe
from hydra_rlhf.config import HydraModelConfig
from hydra_rlhf.run import run_rl


if __name__ == "__main__":
    sys.exit(run_recipe((HydraModelConfig, RLConfig), run_rl))
