"""Shared fixtures: tiny random Llama models with the real SmolLM2 tokenizer (built once per cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Nothing in the test suite may reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models are overhead-bound: one thread per process is faster, and the multi-process tests do not
# oversubscribe two cores (which slows torch's OpenMP down by an order of magnitude).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from hydra_rlhf.model.loading import tiny_model_dir

    return str(tiny_model_dir(seed=0))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from hydra_rlhf.model.loading import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    """40 short prompts as JSONL."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    topics = ["gardening", "cooking pasta", "a rainy weekend", "learning guitar", "saving money", "a morning run",
              "painting a room", "meeting new friends", "a train trip", "baking bread"]
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Give me one tip about {topics[i % 10]} (#{i})."}) + "\n")
    return path


@pytest.fixture(scope="session")
def pairs_files(tmp_path_factory) -> tuple[Path, Path]:
    """Preference pairs with an easy, lexical preference (upbeat vs gloomy), plus two rows that must be skipped."""
    import random

    rng = random.Random(0)
    upbeat = ["Great question, I love it! Have fun and enjoy.", "Wonderful idea, happy to help, this is awesome!",
              "What a lovely plan, you will do great!"]
    gloomy = ["That is bad and sad.", "I hate this, it is terrible and awful.", "No. A horrible, painful problem."]
    directory = tmp_path_factory.mktemp("pairs")
    paths = []
    for name, count in (("train", 48), ("eval", 16)):
        path = directory / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(count):
                f.write(json.dumps({"prompt": f"Tell me about item {i}.", "chosen": rng.choice(upbeat),
                                    "rejected": rng.choice(gloomy)}) + "\n")
            f.write(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
            f.write(json.dumps({"prompt": "   ", "chosen": "a", "rejected": "b"}) + "\n")
        paths.append(path)
    return tuple(paths)


def run(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root, as a user would."""
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


PYTHON = sys.executable
CLI = str(Path(PYTHON).parent / "hydra-rlhf")  # the console script of the venv the tests run in
# `accelerate launch` of the same venv, on a free port: `make test` runs test files side by side (one per core),
# and two launches on accelerate's default port would refuse each other.
ACCELERATE_LAUNCH = [str(Path(PYTHON).parent / "accelerate"), "launch", "--main_process_port", "0"]
# A recipe run in one process and in two (`accelerate launch --multi_gpu --num_processes 2`), for the tests that
# check both layouts make the same run.
LAUNCHERS = {"one": [PYTHON], "two": [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2"]}
