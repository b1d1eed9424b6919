"""Hydra-PPO: PPO on one LoRA-wrapped base that is policy, reference, reward model and critic.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    accelerate launch --num_processes 2 --cpu recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    python recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --mode lora --num_iterations 2

Every field of HydraModelConfig and PPOConfig is a YAML key and a --flag (flags override the YAML);
`python recipes/ppo.py --help` lists them with their help.
"""

import sys

from hydra_rlhf.config import PPOConfig, run_recipe
from hydra_rlhf.hydra_model import HydraModelConfig
from hydra_rlhf.ppo import run_ppo


if __name__ == "__main__":
    sys.exit(run_recipe((HydraModelConfig, PPOConfig), run_ppo))
