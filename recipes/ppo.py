"""Hydra-PPO: PPO on one LoRA-wrapped base that is policy, reference, reward model and critic.

    accelerate launch recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    accelerate launch --num_processes 2 --cpu recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml
    python recipes/ppo.py --config recipes/configs/ppo_smollm2.yaml --mode lora --num_iterations 2

Every field of HydraModelConfig and PPOConfig is a YAML key and a --flag (flags override the YAML);
`python recipes/ppo.py --help` lists them with their help.
"""

import logging
import sys

from trl import TrlParser

from hydra_rlhf.config import PPOConfig
from hydra_rlhf.hydra_model import HydraModelConfig
from hydra_rlhf.ppo import run_ppo


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_config, ppo_config = TrlParser((HydraModelConfig, PPOConfig)).parse_args_and_config(argv)
    except ValueError as error:  # unknown YAML keys, impossible combinations: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_ppo(model_config, ppo_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
