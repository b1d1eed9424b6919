"""What a run keeps on disk, and why it can trust it.

* Every checkpoint (``checkpoints/iter-NNNNNN``, ``final``) is written into a staging directory, closed with a
  ``checkpoint.json`` listing every file's size and sha256, and only then renamed into place. A kill at any
  moment leaves either the old directory or the new one, never a mix; leftover staging directories are removed
  when the next run starts.
* Resuming takes the newest checkpoint whose files still match their ``checkpoint.json`` and says which newer
  ones it skipped (truncated, edited, half-copied), instead of crashing or loading a mix.
* A training checkpoint (``checkpoints/iter-NNNNNN``) holds the model's trained parts (``HydraModel.save_pretrained``)
  and ``trainer_state.pt`` (iteration, optimizer, scheduler, KL controller, running moments), read back with
  ``torch.load(weights_only=True)``: never an arbitrary pickle.
* ``run_settings.json`` records what a run was started with (mode, objective, LoRA settings, the base and a
  fingerprint of its weights); ``--resume`` refuses to continue with anything different and names the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from .model.loading import file_sha256, resolve_model

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "iter-"
STATE_FILE = "trainer_state.pt"
CHECKSUMS_FILE = "checkpoint.json"
RUN_SETTINGS_FILE = "run_settings.json"
STAGING_PREFIX = ".tmp-"


# ------------------------------------------------------------------------------------------ atomic writes


def write_atomically(target: Path, write) -> Path:
    """``write(staging_dir)``, then the checksums, then one rename onto ``target`` (an older ``target`` is moved
    aside first and deleted after)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{STAGING_PREFIX}{target.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    files = {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(staging.rglob("*")) if p.is_file()}
    (staging / CHECKSUMS_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1))
    old = target.with_name(f"{STAGING_PREFIX}{target.name}-old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def clean_staging(directory: Path) -> list[Path]:
    """Remove staging directories a killed run left under ``directory`` and ``directory/checkpoints``."""
    removed = []
    for parent in (Path(directory), Path(directory) / "checkpoints"):
        for path in parent.glob(f"{STAGING_PREFIX}*") if parent.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("Removed %d half-written checkpoint(s) left by an interrupted run.", len(removed))
    return removed


def verify(directory: Path) -> str | None:
    """Why ``directory`` is not an intact checkpoint, or None when every file matches its ``checkpoint.json``."""
    directory = Path(directory)
    listing = directory / CHECKSUMS_FILE
    if not listing.is_file():
        return f"no {CHECKSUMS_FILE} (incomplete, or written by an older version)"
    try:
        files = json.loads(listing.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{CHECKSUMS_FILE} is unreadable"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} changed since it was written"
    return None


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """A run's ``iter-NNNNNN`` directories, oldest first (staging directories never carry that name)."""
    directory = Path(output_dir) / "checkpoints"
    return sorted(directory.glob(f"{CHECKPOINT_PREFIX}*")) if directory.is_dir() else []


def latest_intact_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is named in a warning."""
    for checkpoint in reversed(saved_checkpoints(output_dir)):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("Skipping checkpoint %s: %s.", checkpoint, problem)
    return None


# ------------------------------------------------------------------------------------------- training state


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_PREFIX}{iteration:06d}"


def save_training_state(output_dir: Path, iteration: int, model, state: dict, trained: dict | None = None) -> Path:
    """``checkpoints/iter-NNNNNN``: the model's trained parts (``trained``: gathered from a sharded model) and the
    trainer's ``state``, atomically."""
    import torch

    def write(staging: Path) -> None:
        model.save_pretrained(staging, trained)
        torch.save(state, staging / STATE_FILE)

    return write_atomically(Path(output_dir) / "checkpoints" / checkpoint_name(iteration), write)


def load_training_state(output_dir: Path, model) -> tuple[Path, dict] | None:
    """The newest intact checkpoint's trained parts into ``model``, and the trainer state saved with them."""
    import torch

    checkpoint = latest_intact_checkpoint(output_dir)
    if checkpoint is None:
        return None
    model.load_trained(checkpoint)
    return checkpoint, torch.load(checkpoint / STATE_FILE, weights_only=True)  # never an arbitrary pickle


def resume_hint(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "no checkpoint was saved yet, so a new run starts from the beginning."
    return f"the last checkpoint is {checkpoint}: continue with --resume true (same output_dir and settings)."


# ------------------------------------------------------------------------------------- what a run started with

# The settings a resumed run must share with its start: they shape the adapters, the optimizer state or the
# reference and the reward. Everything else (learning rates, iterations, logging) may change on resume.
RESUME_MODEL_KEYS = ("mode", "model_name_or_path", "reward_model_path", "quantization", "dtype", "lora_r",
                     "lora_alpha", "lora_target_modules", "lora_layers", "adapter_dtype")
RESUME_RUN_KEYS = ("objective", "num_samples_per_prompt", "optim")  # optim: the saved AdamW states' format


def run_settings(model_config, config) -> dict:
    """What ``run_settings.json`` records: the model layout, the objective and the bases' fingerprints."""
    model, run = asdict(model_config), asdict(config)
    settings = {key: model[key] for key in RESUME_MODEL_KEYS} | {key: run[key] for key in RESUME_RUN_KEYS}
    bases = {model_config.model_name_or_path, model_config.reward_model_path or model_config.model_name_or_path}
    settings["base_fingerprints"] = {name: base_fingerprint(resolve_model(name)) for name in sorted(bases)}
    return settings


def base_fingerprint(path: str) -> str | None:
    """A fingerprint of a local model directory: size and modification time of every weight file, sha256 of the
    small files (config, heads). Retraining or replacing the weights changes it; reading them does not. None for
    a hub id (its revision is the hub's business)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(str(file.relative_to(directory)).encode())
        if stat.st_size > 1 << 24:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            digest.update(bytes.fromhex(file_sha256(file)))
    return digest.hexdigest()


def record_or_check_run_settings(output_dir: Path, settings: dict, resume: bool) -> None:
    """A run writes ``run_settings.json`` when it starts; a resumed run must match it, else a one-line error naming
    every difference. (A run saved before this file existed resumes with a warning, and gets one now.)"""
    path = Path(output_dir) / RUN_SETTINGS_FILE
    if resume and path.is_file():
        started = json.loads(path.read_text())
        differences = [f"{key} was {started[key]!r}, now {settings[key]!r}"  # (a key an older run did not record
                       for key in settings  # is not checked)
                       if key != "base_fingerprints" and key in started and started[key] != settings[key]]
        for name, fingerprint in settings["base_fingerprints"].items():
            if started.get("base_fingerprints", {}).get(name, fingerprint) != fingerprint:
                differences.append(f"the weights in {name} changed since the run started")
        if differences:
            raise ValueError(f"cannot resume {output_dir}: {'; '.join(differences)}. Resume with the settings it "
                             "started with (see its run_settings.json), or start a new run in another output_dir.")
        return
    if resume and saved_checkpoints(output_dir):
        logger.warning("%s has no %s (an older run): resuming without checking its settings.", output_dir,
                       RUN_SETTINGS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
