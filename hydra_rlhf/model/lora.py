"""LoRA adapters on a frozen base, through peft (``bias="none"``, so "adapters off" is exactly the base)."""

from __future__ import annotations

import warnings

from torch import nn

from ..config import ModelConfig
from ..memory.levers import adapter_torch_dtype, cast_adapters
from .loading import decoder_layers


def with_lora_adapters(base: nn.Module, adapters: list[str], config: ModelConfig):
    """Wrap a frozen base in a PeftModel carrying the named LoRA adapters (bias none: adapters off == base)."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    num_layers = base.config.num_hidden_layers
    top_layers = None
    if config.lora_layers is not None:
        if not 1 <= config.lora_layers <= num_layers:
            raise ValueError(f"lora_layers must be between 1 and {num_layers} (the model's layers), got {config.lora_layers}.")
        top_layers = list(range(num_layers - config.lora_layers, num_layers))
        if targets == "all-linear":  # peft wants names when layers are selected: the decoder's linear layers
            layers = decoder_layers(base, "lora_layers")
            targets = sorted({name.rsplit(".", 1)[-1] for name, module in layers.named_modules()
                              if isinstance(module, nn.Linear)})
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=top_layers,
        layers_pattern="layers" if top_layers else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads a transformers attribute deprecated in 5.x; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, lora, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, lora)
    compute_dtype = base.get_input_embeddings().weight.dtype  # also on a quantized base, whose linears are packed
    cast_adapters(model, adapter_torch_dtype(config.adapter_dtype, compute_dtype))
    for name, param in model.named_parameters():  # every adapter trainable, never the base
        param.requires_grad_("lora_" in name)
    return model
