"""The HydraModel: one base as policy, reference, reward model and critic (``hydra``), its heads (``heads``), its
LoRA adapters (``lora``), its log-prob kernel (``logprobs``) and how bases load (``loading``)."""

from .hydra import HydraModel, PolicyScores

__all__ = ["HydraModel", "PolicyScores"]
