"""hydra-rlhf: memory-efficient single-GPU PPO. One LoRA-wrapped base model is policy, reference, reward model
and critic (Hydra-RLHF, arXiv 2309.00754). Importing the package is light: modules load torch, transformers and
peft only when used."""

__version__ = "0.1.0"
