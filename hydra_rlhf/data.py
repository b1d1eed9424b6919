"""Data through ``datasets``: bundled demo files, local JSONL/Parquet, or hub datasets.

Formats (TRL's): *standard* rows hold text (``prompt``, ``chosen``, ``rejected``); *conversational* rows hold
lists of ``{"role", "content"}`` messages. Standard prompts are wrapped as one user message so the chat
template applies either way. Bad rows are skipped and counted, never silently kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import HubUnreachable

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "demo_data"
BUNDLED = {
    "demo:train": "demo_prompts_train.jsonl",
    "demo:eval": "demo_prompts_eval.jsonl",
    "demo:preferences-train": "demo_preferences_train.jsonl",
    "demo:preferences-eval": "demo_preferences_eval.jsonl",
    "arithmetic:train": "arithmetic_train.jsonl",  # verifiable task: word problems with an answer column
    "arithmetic:eval": "arithmetic_eval.jsonl",
}


def load_rows(source: str, split: str = "train"):
    """A ``datasets.Dataset`` from a bundled name (``demo:train``...), a local .jsonl/.json/.parquet file, or a hub
    dataset name (needs the network)."""
    import datasets

    from .model.loading import looks_local

    if source in BUNDLED:
        source = str(DATA_DIR / BUNDLED[source])
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists() or looks_local(source):
        if not path.is_file():
            raise FileNotFoundError(f"Data file {source} does not exist (local files: .jsonl, .json or .parquet).")
        if path.suffix not in (".jsonl", ".json", ".parquet"):
            raise ValueError(f"{source}: unknown data format {path.suffix or '(no suffix)'}; use .jsonl, .json or "
                             ".parquet.")
        if path.suffix == ".jsonl":
            check_json_lines(path)
        builder = "parquet" if path.suffix == ".parquet" else "json"
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as error:  # noqa: BLE001 - datasets raises several chained types for one bad file
            cause = error.__cause__ or error
            raise ValueError(f"{source}: could not be read as {builder} ({type(cause).__name__}: "
                             f"{str(cause).splitlines()[0] if str(cause) else ''}).") from None
        if len(rows) == 0:
            raise ValueError(f"{source} holds no rows.")
        return rows
    if source.startswith("demo:"):
        raise ValueError(f"Unknown bundled dataset {source!r}: use one of {', '.join(BUNDLED)}.")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as error:  # offline, unknown name: say what to do instead
        raise HubUnreachable(
            f"{source!r} is not a local file, and loading it as a hub dataset failed ({type(error).__name__}). "
            "Offline, use a local .jsonl/.parquet file or a bundled one (demo:train, demo:preferences-train, ...)."
        ) from error


def check_json_lines(path: Path) -> None:
    """A one-line error naming the first line of a JSONL file that is not a JSON object (or an empty file)."""
    import json

    rows = 0
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object with named columns, got "
                                 f"{type(row).__name__}.")
            rows += 1
    if rows == 0:
        raise ValueError(f"{path} holds no rows.")


def require_columns(rows, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise KeyError(f"{source}: column {missing[0]!r} not found; columns are {rows.column_names}. "
                       "Set the matching *_column option.")


def skip_reason(value) -> str:
    """Why ``as_messages`` gave None for a cell: ``empty`` (missing, blank) or ``not text (<type>)``."""
    messages = isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)
    return "empty" if value is None or isinstance(value, str) or messages else f"not text ({type(value).__name__})"


def as_messages(value, role: str) -> list[dict] | None:
    """Text or a message list, as a message list; ``None`` when empty."""
    if isinstance(value, str):
        return [{"role": role, "content": value.strip()}] if value.strip() else None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value if any(str(m["content"]).strip() for m in value) else None
    return None


def message_text(messages: list[dict]) -> str:
    return "\n".join(str(m["content"]) for m in messages)


@dataclass
class PromptRows:
    """Usable prompt rows: each prompt as a message list, and every other column of the data, aligned with them
    (what reward functions receive as keyword lists, e.g. ``answer``). ``conversational``: the prompt column held
    message lists (TRL's conversational format: completions then reach reward functions as messages too);
    otherwise text, kept in ``texts``."""

    prompts: list[list[dict]]
    columns: dict[str, list]
    conversational: bool
    texts: list[str]
    skipped: Counter

    @classmethod
    def of(cls, prompts: list[list[dict]]) -> "PromptRows":
        """Prompts alone (no other columns), as message lists."""
        return cls(prompts, {}, True, [message_text(m) for m in prompts], Counter())

    def head(self, limit: int | None) -> "PromptRows":
        if not limit:
            return self
        return PromptRows(self.prompts[:limit], {k: v[:limit] for k, v in self.columns.items()}, self.conversational,
                          self.texts[:limit], self.skipped)


def load_prompt_rows(source: str, column: str = "prompt", limit: int | None = None) -> PromptRows:
    """Prompts as message lists with the rest of their rows; empty or non-text prompts are skipped and counted."""
    rows = load_rows(source)
    require_columns(rows, [column], source)
    others = [name for name in rows.column_names if name != column]
    prompts, texts, columns, skipped = [], [], {name: [] for name in others}, Counter()
    values = {name: rows[name] for name in others}  # whole columns: one read each, not one per row
    for index, value in enumerate(rows[column]):
        messages = as_messages(value, "user")
        if messages is None:
            skipped[f"{skip_reason(value)} prompt"] += 1
            continue
        prompts.append(messages)
        texts.append(value.strip() if isinstance(value, str) else message_text(messages))
        for name in others:
            columns[name].append(values[name][index])
    if skipped:
        logger.warning("%s: skipped %s", source, dict(skipped))
    if not prompts:
        raise ValueError(f"{source}: no usable prompts in column {column!r} (skipped {dict(skipped)}).")
    conversational = not isinstance(rows[0][column], str)
    return PromptRows(prompts, columns, conversational, texts, skipped).head(limit)


def load_prompts(source: str, column: str = "prompt", limit: int | None = None) -> tuple[list[list[dict]], Counter]:
    """Prompts as message lists, with a count of skipped rows by reason."""
    rows = load_prompt_rows(source, column, limit)
    return rows.prompts, rows.skipped


def load_preferences(
    source: str, prompt_column="prompt", chosen_column="chosen", rejected_column="rejected", limit=None,
    min_score_margin: float = 0.0,
) -> tuple[list[dict], Counter]:
    """Preference pairs as ``{"prompt": messages, "chosen": messages, "rejected": messages}``; empty rows and
    pairs whose chosen equals rejected are skipped and counted. With ``min_score_margin`` > 0, pairs whose
    ``chosen_score - rejected_score`` is smaller (near-ties: noisy labels) are skipped and counted too."""
    rows = load_rows(source)
    require_columns(rows, [prompt_column, chosen_column, rejected_column], source)
    if min_score_margin > 0:
        require_columns(rows, ["chosen_score", "rejected_score"], source)
        margins = [c - r for c, r in zip(rows["chosen_score"], rows["rejected_score"])]
    else:
        margins = [float("inf")] * len(rows)
    pairs, skipped = [], Counter()
    for prompt_value, chosen_value, rejected_value, margin in zip(rows[prompt_column], rows[chosen_column],
                                                                  rows[rejected_column], margins):
        prompt, chosen = as_messages(prompt_value, "user"), as_messages(chosen_value, "assistant")
        rejected = as_messages(rejected_value, "assistant")
        if prompt is None or chosen is None or rejected is None:
            values = [v for v, m in ((prompt_value, prompt), (chosen_value, chosen), (rejected_value, rejected)) if m is None]
            skipped[skip_reason(values[0])] += 1
        elif message_text(chosen) == message_text(rejected):
            skipped["chosen equals rejected"] += 1
        elif margin < min_score_margin:
            skipped["score margin below minimum"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if skipped:
        logger.warning("%s: skipped %s", source, dict(skipped))
    return pairs[:limit] if limit else pairs, skipped


def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int) -> tuple[list[list[int]], int]:
    """Chat-templated prompt token ids, truncated from the left to ``max_length``; returns (ids, n_truncated)."""
    encoded, truncated = [], 0
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        encoded.append(list(ids))
    return encoded, truncated


def left_pad(sequences: list[list[int]], pad_id: int, length: int | None = None):
    """(input_ids, attention_mask) of left-padded sequences: to the longest one, or to ``length`` tokens (no
    sequence may be longer; ``encode_prompts`` cuts them to it)."""
    import torch
    from trl.trainer.utils import pad

    ids = [torch.tensor(s, dtype=torch.long) for s in sequences]
    input_ids = pad(ids, padding_value=pad_id, padding_side="left", pad_to_multiple_of=length)
    mask = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left", pad_to_multiple_of=length)
    return input_ids, mask
