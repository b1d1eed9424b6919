"""An external reward model: a frozen sequence-classification checkpoint scoring prompt + completion.

This is TRL's "reward model as a reward function": ``AutoModelForSequenceClassification`` with one label, its own
tokenizer and chat template (a reward model was trained on its template, not the policy's), and the score is
``logits[:, 0]`` at the last token. It is a second model on the GPU beside the Hydra base, so it loads frozen, in eval
mode, optionally 4-bit/8-bit through bitsandbytes, and reports its bytes (:meth:`memory_bytes`) to the profiler.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.loading import load_error, looks_local, quantization_config


class ExternalRewardModel:
    """Scores ``(prompt, completion)`` pairs with a sequence-classification reward model.

    Texts: for conversational prompts (message lists) the tokenizer's chat template over ``prompt + [assistant
    completion]``; for text prompts ``prompt + completion`` (TRL's choice). A tokenizer without a chat template
    joins a conversation's message contents with newlines ("prompt\\ncompletion"). A missing pad token becomes EOS.
    """

    def __init__(self, name_or_path: str, device: str | torch.device, dtype: torch.dtype | None = None,
                 quantization: str = "none", trust_remote_code: bool = False, batch_size: int = 8):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.name = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        path = str(Path(name_or_path).expanduser())
        if not Path(path).exists() and looks_local(name_or_path):
            raise FileNotFoundError(f"reward_model {name_or_path}: no such directory (give a local directory or a hub "
                                    "id such as 'org/name').")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:  # transformers: OSError for files, ValueError for a bad config
            raise load_error(path, error) from error
        # Reading the config first refuses a classifier of several labels before its weights are loaded.
        if config.num_labels != 1:
            raise ValueError(f"reward_model {name_or_path} has {config.num_labels} labels (num_labels); a reward model "
                             "gives one score: use a sequence-classification checkpoint with num_labels=1.")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # a too-long text keeps its end, where the score is read
        self.model = self._load(AutoModelForSequenceClassification, path, dtype, quantization, trust_remote_code)
        # The score is read at the last non-pad token, found through the config's pad id (batches need one).
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.requires_grad_(False)
        self.model.eval()
        # Texts beyond the reward model's context would fail; they are cut at the front (truncation_side above).
        self.max_length = getattr(config.get_text_config(), "max_position_embeddings", None)

    def _load(self, auto, path: str, dtype, quantization: str, trust_remote_code: bool):
        kwargs = {"dtype": dtype if dtype is not None else "auto", "trust_remote_code": trust_remote_code}
        bnb = quantization_config(quantization, compute_dtype=dtype or torch.float32)
        if bnb is not None:
            kwargs.update(quantization_config=bnb, device_map={"": str(self.device)})  # placed at load time
        try:
            model = auto.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as error:
            raise load_error(path, error) from error
        return model if bnb is not None else model.to(self.device)

    def texts(self, prompts: list, completions: list) -> list[str]:
        """What the reward model reads for each pair (see the class docstring)."""
        return [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]

    def _text(self, prompt, completion) -> str:
        if isinstance(prompt, str):
            return prompt + (completion if isinstance(completion, str) else completion[-1]["content"])
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        messages = list(prompt) + list(reply)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(str(m["content"]) for m in messages)

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_) -> list[float]:
        """One score per completion, ``logits[:, 0]``, in batches of ``batch_size``."""
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", truncation=self.max_length is not None,
                                   max_length=self.max_length, add_special_tokens=False)
            logits = self.model(**batch.to(self.device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores

    def memory_bytes(self) -> int:
        """Bytes of its parameters and buffers (shared tensors once), for the memory profiler."""
        tensors = {t.data_ptr(): t for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())
