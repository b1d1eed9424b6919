"""Moved: the estimator is ``memory/shape.py`` (model and run shapes, cards), ``memory/formulas.py`` (the bytes)
and ``memory/report.py`` (``hydra-rlhf estimate``). Kept only for tests/test_vllm.py's import of
``VLLM_LORA_RANKS``; delete once that test imports it from ``memory.formulas``."""

from .formulas import VLLM_LORA_RANKS  # noqa: F401
