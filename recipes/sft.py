"""Hydra-SFT: train one checkpoint that is both the SFT policy and the reward model.

    accelerate launch recipes/sft.py --config recipes/configs/sft_smollm2.yaml
    python recipes/sft.py --config recipes/configs/sft_smollm2.yaml --sft_objective sft --output_dir runs/sft-plain

`--objective hydra|sft|reward` picks the joint objective or one of the plain ones (the `lora` and `full`
PPO baselines keep the SFT model and the reward model apart). Every field of ModelConfig and SFTConfig is a
YAML key and a --flag; `python recipes/sft.py --help` lists them. The checkpoint in output_dir is what
`recipes/ppo.py` takes as model_name_or_path.
"""

import sys

from hydra_rlhf.config import run_recipe
from hydra_rlhf.config import ModelConfig
from hydra_rlhf.sft import SFTConfig, run_sft


if __name__ == "__main__":
    sys.exit(run_recipe((ModelConfig, SFTConfig), run_sft))
