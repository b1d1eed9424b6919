"""Memory measured per named stage, with one helper everywhere.

``MemoryProfiler.stage(name)`` records, for the stage, the peak bytes and the change (end - start):

* CUDA: torch's allocator statistics, peak reset at every stage start (``max_memory_allocated``), with the
  reserved peak alongside.
* CPU: there is no allocator peak, so we count **live tensor storages**: a ``TorchDispatchMode`` sees every
  tensor an op creates, counts its storage once, and uncounts it when the last tensor on it dies. Tensors that
  existed before profiling started (the weights) are registered up front. This measures tensors only, not the
  Python/library overhead, so it means the same thing in every mode. The process's peak RSS (``VmHWM``,
  reset per stage through ``/proc/self/clear_refs``) is recorded beside it as a cross-check.

Both report the same keys, so the table and the JSON read the same on either device.
"""

from __future__ import annotations

import json
import time
import weakref
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..layout import STAGE_ORDER

CPU_MEASURE = "live tensor-storage bytes (TorchDispatchMode accounting); peak RSS alongside"
CUDA_MEASURE = "torch.cuda max_memory_allocated, peak reset per stage"


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages, and their peak since the last ``reset_peak``. A storage resized in
    place (FSDP2 frees and re-allocates its gathered weights that way, out of the dispatcher's sight) is counted at
    its new size: ``UntypedStorage.resize_`` reports to the tracker while it is active."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, list[int]] = {}  # storage (its StorageImpl) -> [nbytes, live tensors counted on it]
        self.current = 0
        self.peak = 0
        self._resize = None

    def __enter__(self):
        self._resize = resize = torch.UntypedStorage.resize_

        def counted_resize(storage, nbytes):
            entry = self._refs.get(storage._cdata)
            out = resize(storage, nbytes)
            if entry is not None:
                self._grow(storage.nbytes() - entry[0])
                entry[0] = storage.nbytes()
            return out

        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out

    def _grow(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        try:
            storage = local_shard(tensor).untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
        except RuntimeError:  # a collective's wrapper output (DTensor.full_tensor) has no storage of its own
            return
        entry = self._refs.get(key)
        if entry is None:  # (an empty storage too: FSDP2 resizes it to a gathered weight later)
            entry = self._refs[key] = [nbytes, 0]
            self._grow(nbytes)
        entry[1] += 1
        # torch keeps a tensor's Python object alive while C++ still holds it (autograd's saved tensors
        # included), so this fires when the tensor itself is freed.
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._refs[key]
            self.current -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.current


def _read_proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        pass


class MemoryProfiler:
    """Per-stage memory for a PPO run. Use one instance for the whole run::

        profiler = MemoryProfiler(device, tensors=model.parameters())
        with profiler.stage("generate"):
            ...
        profiler.end_iteration()  # appends one JSONL record when ``log_path`` is set

    On CPU it installs the tensor accounting for its whole life (``close()`` removes it), so tensors that live
    across stages - rollouts, optimizer state - are counted in every stage they are alive in.
    """

    def __init__(self, device: torch.device | str, tensors=(), log_path: str | Path | None = None, enabled=True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.log_path = Path(log_path) if log_path else None
        self.iteration_record: dict[str, dict] = {}
        self.history: list[dict[str, dict]] = []
        self._tracker = None
        self.engine_bytes = None  # () -> bytes a generation engine holds outside these tensors (vLLM), when set
        if not enabled:
            self.measure = "disabled"
        elif self.device.type == "cuda":
            self.measure = CUDA_MEASURE
        else:
            self.measure = CPU_MEASURE
            self._tracker = LiveTensorBytes()
            for tensor in tensors:
                self._tracker.track(tensor)
            self._tracker.__enter__()

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._tracker.current if self._tracker else 0

    @contextmanager
    def stage(self, name: str):
        if not self.enabled:
            yield
            return
        start = self._start()
        began = time.perf_counter()
        try:
            yield
        finally:
            record = self._finish(start)
            record["seconds"] = round(time.perf_counter() - began, 4)
            if self.engine_bytes is not None:
                record["engine_bytes"] = self.engine_bytes()
            self.iteration_record[name] = record

    def _start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker.reset_peak()
            _reset_peak_rss()
        return self.current_bytes()

    def _finish(self, start: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            end = torch.cuda.memory_allocated(self.device)
            return {"peak_bytes": torch.cuda.max_memory_allocated(self.device), "delta_bytes": end - start,
                    "end_bytes": end, "reserved_peak_bytes": torch.cuda.max_memory_reserved(self.device)}
        end = self._tracker.current
        return {"peak_bytes": self._tracker.peak, "delta_bytes": end - start, "end_bytes": end,
                "rss_peak_bytes": _read_proc_status("VmHWM")}

    def end_iteration(self, step: int | None = None) -> dict[str, dict]:
        """Close the iteration's record, append it to the JSONL log, and return it."""
        record, self.iteration_record = self.iteration_record, {}
        if record:
            self.history.append(record)
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"step": step, "measure": self.measure, "stages": record}) + "\n")
        return record

    def summary(self) -> dict[str, dict]:
        """Per stage over all iterations: the largest peak and the mean change, plus the overall peak."""
        return summarize(self.history)

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or shared weights count once)."""
    storages = {s.data_ptr(): s.nbytes() for s in (local_shard(t).untyped_storage() for t in tensors)}
    return sum(storages.values())


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """What this process stores of ``tensor``: its shard where FSDP2 sharded it (a DTensor), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def persistent_bytes(model, optimizer) -> int:
    """What lives in every stage of a run: the model's weights, adapters and heads, and the optimizer's state."""
    state = [value for entry in optimizer.state.values() for value in entry.values() if torch.is_tensor(value)]
    return storage_bytes([*model.parameters(), *model.buffers(), *state])


def process_tree_pss(pid: int | None = None) -> int:
    """Proportional set size (Linux) of a process and all its children, summed: memory two processes share (the
    async generator's base) counts once in the sum, split between them. 0 where PSS is not available."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.Error, AttributeError):  # gone meanwhile, or no PSS on this platform
            pass
    return total


def torch_shared_bytes(pid: int, other_pid: int) -> int:
    """Resident bytes, in ``pid``, of torch's shared-memory segments that ``other_pid`` maps too: tensors the two
    processes hold once between them (CPU tensors sent through ``torch.multiprocessing``)."""
    import psutil

    def segments(process_id: int) -> dict[str, int]:
        found: dict[str, int] = defaultdict(int)
        for mapping in psutil.Process(process_id).memory_maps(grouped=False):
            if "/torch_" in mapping.path:
                found[mapping.path] += mapping.rss
        return found

    mine, theirs = segments(pid), segments(other_pid)
    return sum(size for path, size in mine.items() if path in theirs)


def summarize(history: list[dict[str, dict]]) -> dict[str, dict]:
    stages: dict[str, dict] = defaultdict(lambda: {"peak_bytes": 0, "delta_bytes": [], "seconds": []})
    for record in history:
        for name, values in record.items():
            entry = stages[name]
            entry["peak_bytes"] = max(entry["peak_bytes"], values["peak_bytes"])
            entry["delta_bytes"].append(values["delta_bytes"])
            entry["seconds"].append(values.get("seconds", 0.0))
            if "engine_bytes" in values:  # a vLLM engine's own memory, outside these tensors
                entry["engine_bytes"] = max(entry.get("engine_bytes", 0), values["engine_bytes"])
    ordered = sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
    return {
        name: {"peak_bytes": stages[name]["peak_bytes"],
               "delta_bytes": round(sum(stages[name]["delta_bytes"]) / len(stages[name]["delta_bytes"])),
               "seconds": round(sum(stages[name]["seconds"]) / len(stages[name]["seconds"]), 3),
               **({"engine_bytes": stages[name]["engine_bytes"]} if "engine_bytes" in stages[name] else {})}
        for name in ordered
    }


def read_memory_log(path: str | Path) -> tuple[str, list[dict[str, dict]]]:
    """(measure, per-iteration stage records) from a run's ``memory.jsonl``."""
    measure, history = "unknown", []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            history.append(row["stages"])
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}, line {number}: not a memory record ({error}).") from None
        measure = row.get("measure", measure)
    return measure, history


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def wide_console():
    """A rich Console as wide as the terminal, or 120 columns when output is a pipe or a notebook log."""
    import shutil

    from rich.console import Console

    return Console(width=max(shutil.get_terminal_size((120, 24)).columns, 100))


def stage_table(columns: dict[str, dict[str, dict]], title: str = "Memory per stage"):
    """A rich Table: one row per stage, one column per mode (or run), each cell ``peak (change)``, and what a vLLM
    engine held beside them (``+ engine``) where one sampled."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("stage")
    for name in columns:
        table.add_column(f"{name}\npeak (change)", justify="right")
    stages = []
    for summary in columns.values():
        stages += [s for s in summary if s not in stages]
    for stage in stages:
        cells = []
        for summary in columns.values():
            values = summary.get(stage)
            cell = f"{format_bytes(values['peak_bytes'])} ({_signed(values['delta_bytes'])})" if values else "-"
            if values and "engine_bytes" in values:
                cell += f" + engine {format_bytes(values['engine_bytes'])}"
            cells.append(cell)
        table.add_row(stage, *cells)
    overall = [max(v["peak_bytes"] for v in summary.values()) if summary else 0 for summary in columns.values()]
    table.add_row("[bold]overall peak[/bold]", *[f"[bold]{format_bytes(o)}[/bold]" for o in overall])
    return table


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_bytes(abs(n))
