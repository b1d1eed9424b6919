"""What ``hydra-rlhf estimate`` estimates, with no weights and no torch: the model's shape (``ModelShape``, read
from a config.json or a bundled preset), the run's shape (``EstimateSettings``: a ``config.RunShape`` plus the
device and the prompts' padding) and the cards it should fit (``GPUS``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import DTYPES, RunShape
from ..errors import check_at_least_one, check_choice
from ..layout import check_sharding, counts, objective_info, role_plan

PRESET_DIR = Path(__file__).parents[1] / "presets"
GiB = 1 << 30
MiB = 1 << 20
DEVICES = ("cuda", "cpu")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# ------------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder; everything the estimate needs from a config.json."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

    @classmethod
    def from_config(cls, source, name: str | None = None) -> ModelShape:
        """From a config dict, a ``transformers.PretrainedConfig``, a config.json path or a model directory.
        A missing or malformed key is a one-line ``ValueError`` naming the file and the key."""
        config, where = _read_config(source)
        config = config.get("text_config", config) if "hidden_size" not in config else config
        for key in cls.REQUIRED:
            if key not in config:
                needed = ", ".join(cls.REQUIRED)
                raise ValueError(f"{where}: missing key {key!r} (a Llama-style decoder config needs {needed})")
        values = {key: _positive_int(config, key, where) for key in cls.REQUIRED}
        heads = values["num_attention_heads"]
        kv_heads = _positive_int(config, "num_key_value_heads", where) if config.get("num_key_value_heads") else heads
        head_dim = (_positive_int(config, "head_dim", where) if config.get("head_dim")
                    else values["hidden_size"] // heads)
        return cls(
            name=name or config.get("_name_or_path") or where, hidden_size=values["hidden_size"],
            num_layers=values["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            intermediate_size=values["intermediate_size"], vocab_size=values["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # LlamaConfig's default
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder's linear layers: what bitsandbytes quantizes and LoRA wraps."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes())

    @property
    def dense_params(self) -> int:
        """Parameters that stay in the compute dtype even on a quantized base: embeddings, lm_head, norms."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.vocab_size * self.hidden_size + head + norms

    @property
    def num_params(self) -> int:
        return self.linear_params + self.dense_params

    def lora_params(self, r: int, layers: int | None = None) -> int:
        """One adapter on all seven linears of ``layers`` decoder layers (default: all): A (r x in) + B (out x r)
        each, no bias."""
        return self.adapted_layers(layers) * r * sum(i + o for i, o in self.linear_shapes())

    def adapted_layers(self, lora_layers: int | None) -> int:
        """How many decoder layers carry LoRA: the top ``lora_layers``, or all."""
        return min(lora_layers or self.num_layers, self.num_layers)

    @property
    def largest_linear(self) -> int:
        return max(i * o for i, o in self.linear_shapes())


def _read_config(source) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, "config"
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return source.to_dict(), getattr(source, "name_or_path", "") or type(source).__name__
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")  # noqa: TRY004 - bad input
    return config, str(path)


def _positive_int(config: dict, key: str, where: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
    return value


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ModelShape:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown preset {name!r}: choose one of {', '.join(presets())}, or pass --config")
    return ModelShape.from_config(path, name=name)


def shape_from_hub(repo_id: str) -> ModelShape:
    """A hub id's config through transformers (network needed); offline or unknown ids are one-line errors."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(repo_id)
    except Exception as error:  # noqa: BLE001 - offline, gated, typo: all end the same way for the user
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"could not fetch the config of {repo_id!r} from the Hugging Face hub "
                         f"({type(error).__name__}: {first}); offline, use --preset or --config path/config.json"
                         ) from None
    return ModelShape.from_config(config, name=repo_id)


# --------------------------------------------------------------------------------------------------- the run


@dataclass
class EstimateSettings(RunShape):
    """A ``RunShape`` (the recipes' keys: ``batch_size`` counts prompts, ``sequences`` = prompts x k) plus what
    only the estimator needs. Its defaults describe a GPU run of 256 + 256 tokens; ``dtype`` auto is bf16 on
    cuda and fp32 on cpu, as a run resolves it."""

    max_prompt_length: int = 256  # prompt tokens (P), left-padded to exactly this
    max_new_tokens: int = 256  # generated tokens (G); EOS ignored, as in the profiler
    device: str = "cuda"  # cuda: AdamW uses foreach kernels (one parameter-sized temporary); cpu: per tensor
    padded_prompts: bool = True  # prompts of unequal length -> an attention mask -> k, v repeated to all heads
    gpus: int = 1  # processes, one card each; batch_size stays per process, as in the recipes
    sharding: str = "none"  # fsdp2: each process holds 1/gpus of the base, adapters, heads and AdamW states

    def __post_init__(self):
        super().__post_init__()  # the run's own rules (layout.check_*), worded once
        check_choice("device", self.device, DEVICES)
        check_at_least_one(self, "gpus")
        check_sharding(self.sharding, self.generation_backend, self.fusion, quantization=self.quantization)

    @property
    def shards(self) -> int:
        """Into how many parts the model's state is split on each rank: gpus with fsdp2, else 1 (replicas)."""
        return self.gpus if self.sharding == "fsdp2" else 1

    @property
    def compute_dtype(self) -> str:
        """The base's compute dtype by its config name: ``dtype``, or for auto what a run on ``device`` picks."""
        if self.dtype == "auto":
            return "bfloat16" if self.device == "cuda" else "float32"
        return DTYPES[self.dtype]

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def layout(self) -> dict[str, int]:
        """base_copies, adapters, full_copies, train_graphs, value_heads of this mode and objective."""
        return counts(role_plan(self.mode, objective_info(self.objective).critic))

    @property
    def adapter_bytes(self) -> int:
        """Bytes per LoRA element (weights, gradients, torch AdamW states): fp32, or the compute dtype."""
        return self.dtype_bytes if self.adapter_dtype == "compute" else 4

    @property
    def offload(self) -> bool:
        """Whether saved activations leave the device (CUDA only, as in the toolkit)."""
        return self.activation_offload and self.device == "cuda"

    def logit_tokens(self, rows: int) -> int:
        """Response tokens whose vocab-sized logits exist at once: all of ``rows`` x G, or one chunk."""
        whole = rows * self.max_new_tokens
        return min(whole, self.logprob_chunk_size) if self.logprob_chunk_size else whole

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_new_tokens


# ------------------------------------------------------------------------------------------------- the cards

# not modelled: CUDA context (~0.3-0.5 GiB), cuBLAS/cuDNN workspaces (~64 MiB on an H200), fragmentation (reserved
# minus allocated peaks: 0.1-0.4 GiB on an H200, docs/gpu.md)
CUDA_RESERVED_BYTES = 1 * GiB


@dataclass(frozen=True)
class GPU:
    name: str
    total_mib: int  # nvidia-smi "memory.total" of the card (what the driver exposes, not the marketing GB)

    @property
    def usable_bytes(self) -> int:
        """Memory left for tensors: the card's total minus ``CUDA_RESERVED_BYTES``."""
        return self.total_mib * MiB - CUDA_RESERVED_BYTES


GPUS = (
    GPU("T4 16GB", 15360),
    GPU("L4 24GB", 23034),
    GPU("RTX 4090 24GB", 24564),
    GPU("A100 40GB", 40960),
    GPU("L40S 48GB", 46068),
    GPU("RTX A6000 48GB", 49140),
    GPU("A100 80GB", 81920),
    GPU("H100 80GB", 81559),
)


def find_gpu(name: str) -> GPU:
    """The card of ``GPUS`` named ``name`` (any case), or whose name starts with it as whole words ('T4', 'L4',
    'rtx 4090', 'A100 80'), or failing that as a plain prefix ('RTX A6'); ambiguous or unknown names are one-line
    errors that list the cards."""
    query = " ".join(name.lower().split())
    names = {gpu: gpu.name.lower() for gpu in GPUS}
    for rule in (lambda n: n == query, lambda n: (n + " ").startswith(query + " "), lambda n: n.startswith(query)):
        matches = [gpu for gpu, lowered in names.items() if rule(lowered)]
        if matches:
            break
    if len(matches) != 1:
        problem = "matches several cards" if matches else "is not in the GPU table"
        raise ValueError(f"--gpu {name!r} {problem}: use one of {', '.join(repr(gpu.name) for gpu in GPUS)}, or "
                         "--memory-budget for another card.")
    return matches[0]
