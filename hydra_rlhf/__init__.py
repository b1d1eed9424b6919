"""hydra-rlhf: memory-efficient single-GPU RLHF. One LoRA-wrapped base model is policy, reference, reward model
and critic (Hydra-RLHF, arXiv 2309.00754). Importing the package is light: modules load torch, transformers and
peft only when used."""

import logging as _logging

__version__ = "0.1.0"


class _DropNoise(_logging.Filter):
    """Third-party lines every CPU run would print and nobody can act on."""

    def filter(self, record: _logging.LogRecord) -> bool:
        # bitsandbytes 0.50 on a CPU with AVX512-BF16: an optional kernel package is missing; its own path works.
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNoise())
