"""The CPU memory measure counts live tensor storages exactly, on cases checked by hand."""

import torch

from hydra_rlhf.memory.profiler import LiveTensorBytes, MemoryProfiler, format_bytes, read_memory_log, summarize

MB = 1_000_000


def test_counts_allocations_views_and_frees():
    tracker = LiveTensorBytes()
    with tracker:
        x = torch.empty(MB // 4)  # 1 MB
        view = x[:10]  # a view shares the storage: no new bytes
        assert tracker.current == MB
        y = x + 1
        assert tracker.current == 2 * MB
        del x, y
        assert tracker.current == MB  # the view keeps x's storage alive
        del view
        assert tracker.current == 0
    assert tracker.peak == 2 * MB


def test_storages_resized_in_place_count_at_their_new_size():
    # FSDP2 frees a gathered weight by resizing its storage to 0 and gathers it again into the same storage
    tracker = LiveTensorBytes()
    with tracker:
        x = torch.empty(MB // 4)
        x.untyped_storage().resize_(0)
        assert tracker.current == 0
        x.untyped_storage().resize_(2 * MB)
        assert tracker.current == 2 * MB
        del x
        assert tracker.current == 0
    assert tracker.peak == 2 * MB
    assert torch.UntypedStorage.resize_ is not None and tracker._resize is torch.UntypedStorage.resize_  # restored


def test_saved_activations_count_until_backward():
    profiler = MemoryProfiler("cpu")
    try:
        with profiler.stage("forward"):
            w = torch.randn(MB // 4, requires_grad=True)  # 1 MB
            out = (w * 2).exp().sum()  # w*2 is freed; exp's output is saved for backward
        record = profiler.iteration_record["forward"]
        assert record["delta_bytes"] == 2 * MB + 4  # w + saved exp output + the scalar
        assert record["peak_bytes"] == 3 * MB  # w, w*2 and exp(w*2) alive together, before the sum
        with profiler.stage("backward"):
            out.backward()
        # the saved activation is released and w.grad (1 MB) appears: the change is zero
        assert profiler.iteration_record["backward"]["delta_bytes"] == 0
        assert w.grad is not None
    finally:
        profiler.close()


def test_registered_weights_and_jsonl_log(tmp_path):
    weights = torch.zeros(MB // 4)
    profiler = MemoryProfiler("cpu", tensors=[weights], log_path=tmp_path / "memory.jsonl")
    try:
        for step in (1, 2):
            with profiler.stage("generate"):
                scratch = torch.ones(MB // 2)  # 2 MB, freed within the stage
                del scratch
            profiler.end_iteration(step)
    finally:
        profiler.close()
    measure, history = read_memory_log(tmp_path / "memory.jsonl")
    assert "tensor-storage" in measure and len(history) == 2
    summary = summarize(history)
    assert summary["generate"]["peak_bytes"] == 3 * MB
    assert summary["generate"]["delta_bytes"] == 0
    assert history[0]["generate"]["rss_peak_bytes"] > 0


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.5 GiB"
