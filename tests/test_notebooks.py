"""The notebooks run top to bottom in smoke mode (HYDRA_RLHF_SMOKE=1: CPU-sized settings, no network): on a tiny
random model in the default suite, on the bundled model under the ``slow`` marker. The committed copies carry the
outputs of a smoke run on the bundled model.

Executed through nbclient with the ``python3`` kernel (``make install`` registers it); outputs go to a temporary
directory and the notebooks on disk are left untouched. To refresh the committed outputs after editing a
notebook, run it the same way and save it (outputs of the run go to notebooks/runs/, which git ignores)::

    python tests/test_notebooks.py notebooks/01_quickstart.ipynb notebooks/02_memory.ipynb
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/hydra-rlhf/hydra-rlhf/blob/main/notebooks/"


# Each notebook runs twice: on a tiny random model with the real tokenizer (HYDRA_RLHF_MODEL: the default suite,
# every cell and assertion but in seconds), and as committed, on the bundled model (slow).
MODELS = [pytest.param("tiny", id="tiny"), pytest.param("bundled", id="bundled", marks=pytest.mark.slow)]


def execute(path: Path, run_dir: Path, monkeypatch, model: str | None = None):
    """Run every cell in order; an error in any cell raises ``CellExecutionError`` with its traceback. ``model``:
    the notebook's model instead of its smoke default (HYDRA_RLHF_MODEL)."""
    monkeypatch.setenv("HYDRA_RLHF_SMOKE", "1")
    if model is not None:
        monkeypatch.setenv("HYDRA_RLHF_MODEL", model)
    monkeypatch.setenv("HYDRA_RLHF_RUN_DIR", str(run_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment: no hub downloads
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return notebook


def output_text(notebook) -> str:
    """Everything the code cells printed or displayed as plain text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                parts.append(output["text"])
            elif output["output_type"] in ("execute_result", "display_data"):
                parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def errors(notebook) -> list[str]:
    return [f"{o['ename']}: {o['evalue']}" for c in notebook.cells for o in c.get("outputs", [])
            if o["output_type"] == "error"]


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"01_quickstart.ipynb", "02_memory.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shows_a_complete_run(path):
    """Every code cell was executed, in order, without an error, and shows its output: what a reader sees on
    GitHub or Colab is a real run, not pasted text."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, f"{path.name}: cells never executed: {[i for i, n in enumerate(counts) if n is None]}"
    assert counts == sorted(counts), f"{path.name}: cells executed out of order: {counts}"
    assert not errors(notebook), f"{path.name}: {errors(notebook)}"
    assert "/work/" not in output_text(notebook) and "/tmp/" not in output_text(notebook), "machine paths in outputs"
    first = notebook.cells[0].source
    assert COLAB_URL + path.name in first, f"{path.name}: no 'Open in Colab' badge in the first cell"


def notebook_model(request, which: str) -> str | None:
    """The tiny test model's directory, or None for the notebook's own (the bundled model in smoke mode)."""
    return request.getfixturevalue("tiny_model") if which == "tiny" else None


@pytest.mark.parametrize("which", MODELS)
def test_quickstart_runs_sft_ppo_and_saves_adapters(tmp_path, monkeypatch, request, which):
    run_dir, model = tmp_path / "runs", notebook_model(request, which)
    notebook = execute(NOTEBOOK_DIR / "01_quickstart.ipynb", run_dir, monkeypatch, model)
    assert not errors(notebook)
    text = output_text(notebook)
    assert re.search(r"held-out reward accuracy \d+\.\d% on \d+ pairs", text)
    assert re.search(r"gold score \(VADER\):\s+[+-]\d\.\d{3} \(SFT\)\s+->\s+[+-]\d\.\d{3} \(PPO\)", text), text[-3000:]
    assert re.search(r"base copies in memory:\s+1\b", text)
    assert re.search(r"frozen base unchanged:\s+True", text)
    assert "score_frozen" in text and "measure:" in text  # the memory table
    ppo = run_dir / "ppo"
    summary = json.loads((ppo / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["base_copies"] == 1 and summary["frozen_base_unchanged"]
    assert set(summary["memory"]) == {"generate", "score_frozen", "score_policy", "advantages", "train", "log"}
    for name in ("training.png", "memory.png", "final/hydra_manifest.json", "final/hydra/heads.safetensors",
                 "final/shared/actor/adapter_model.safetensors", "final/shared/critic/adapter_model.safetensors"):
        assert (ppo / name).is_file(), name
    assert re.search(r"policy\s+\(gold [+-]\d\.\d\d\):", text)  # the reloaded adapters answered
    for objective in ("rloo", "grpo", "online_dpo"):  # the critic-free objectives from the same checkpoint
        other = json.loads((run_dir / objective / "summary.json").read_text())
        assert other["objective"] == objective and other["base_copies"] == 1 and other["frozen_base_unchanged"]
        assert not (run_dir / objective / "final" / "shared" / "critic").exists()
        # what persists between stages (weights, adapters, optimizer state): one adapter and its AdamW states fewer
        assert other["memory"]["log"]["peak_bytes"] < summary["memory"]["log"]["peak_bytes"]
    # section 9: a reward function defined in a cell, beside the built-in accuracy, on the plain base
    assert re.search(r"held-out accuracy \(greedy\): \d+\.\d% -> \d+\.\d% on \d+ problems", text), text[-2000:]
    arithmetic = json.loads((run_dir / "arithmetic" / "summary.json").read_text())
    assert {"reward/accuracy/mean", "reward/answer_is_short/mean"} <= set(arithmetic["final_metrics"])
    settings = json.loads((run_dir / "arithmetic" / "run_settings.json").read_text())
    assert settings["model_name_or_path"] == (model or "smollm2-135m")  # the model the test meant


@pytest.mark.parametrize("which", MODELS)
def test_memory_notebook_estimates_and_profiles_the_four_modes(tmp_path, monkeypatch, request, which):
    run_dir, model = tmp_path / "runs", notebook_model(request, which)
    notebook = execute(NOTEBOOK_DIR / "02_memory.ipynb", run_dir, monkeypatch, model)
    assert not errors(notebook)
    text = output_text(notebook)
    estimate = json.loads((run_dir / "estimate.json").read_text())
    assert set(estimate["modes"]) == {"lora", "j-hydra", "hydra"}  # full cannot use the 4-bit base: skipped
    results = json.loads((run_dir / "profile.json").read_text())
    assert results["settings"]["model"] == (model or "smollm2-135m")  # the model the test meant
    modes = results["modes"]
    assert {m: r["base_copies"] for m, r in modes.items()} == {"full": 4, "lora": 2, "j-hydra": 1, "hydra": 1}
    assert all(r["frozen_base_unchanged"] for r in modes.values())
    assert results["ratios"]["hydra/full"] < 0.5
    assert "peak hydra/full" in text and "overall peak" in text
    assert (run_dir / "profile.png").is_file()
    assert "estimate / measured" in text
    assert re.search(r"train-stage peak without the critic: .* less\)", text)
    assert "gradient checkpointing" in text and "largest batch on my GPU" in text  # sections 5: ratios, levers
    cut = re.search(r"all levers: (-?\d+)% less above the persistent bytes", text)
    assert cut and int(cut.group(1)) > 20, text[-2000:]


def refresh(paths: list[Path]) -> None:
    """Execute each notebook in smoke mode and save it with its outputs (see the module docstring)."""
    os.environ.update(HYDRA_RLHF_SMOKE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.perf_counter() - started:.0f} s and saved")


if __name__ == "__main__":
    refresh([Path(arg).resolve() for arg in sys.argv[1:]] or NOTEBOOKS)
