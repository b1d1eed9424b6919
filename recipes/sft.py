"""Hydra-SFT: train one checkpoint that is both the SFT policy and the reward model.

    accelerate launch recipes/sft.py --config recipes/configs/sft_smollm2.yaml
    python recipes/sft.py --config recipes/configs/sft_smollm2.yaml --objective sft --output_dir runs/sft-plain

`--objective hydra|sft|reward` picks the joint objective or one of the plain ones (the `lora` and `full`
PPO baselines keep the SFT model and the reward model apart). Every field of ModelConfig and SFTConfig is a
YAML key and a --flag; `python recipes/sft.py --help` lists them. The checkpoint in output_dir is what
`recipes/ppo.py` takes as model_name_or_path.
"""

import logging
import sys

from trl import TrlParser

from hydra_rlhf.hydra_model import ModelConfig
from hydra_rlhf.sft import SFTConfig, run_sft


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        model_config, sft_config = TrlParser((ModelConfig, SFTConfig)).parse_args_and_config(argv)
    except ValueError as error:  # unknown YAML keys, impossible combinations: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        run_sft(model_config, sft_config)
    except (KeyError, FileNotFoundError, ValueError) as error:  # bad data: the message names file and column
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
