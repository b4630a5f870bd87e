"""tools/bench.py Monitor: per-process GPU memory peaks (NVML) next to the device-wide peak, so
a capped run shows which process holds memory outside vLLM's budget (issue 11)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import psutil

from tools import bench


class _FakeNvml:
    def __init__(self) -> None:
        self.calls = 0

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list:
        self.calls += 1
        used = [2 * 2**30, 3 * 2**30][min(self.calls - 1, 1)]
        return [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=used),
            SimpleNamespace(pid=999_999_999, usedGpuMemory=2**29),  # gone: name unknown
            SimpleNamespace(pid=1, usedGpuMemory=None),  # NVML could not say: skipped
        ]


def test_per_process_peaks_are_kept_and_reported() -> None:
    m = bench.Monitor()
    nv = _FakeNvml()
    m._sample_processes(nv, None, psutil)
    m._sample_processes(nv, None, psutil)
    me = [k for k in m.proc_peaks if k.startswith(f"{os.getpid()} ")]
    assert len(me) == 1 and m.proc_peaks[me[0]] == 3.0
    assert m.proc_peaks["999999999 ?"] == 0.5
    assert not any(k.startswith("1 ") for k in m.proc_peaks)
    assert m.summary(0, 1)["gpu_mem_peak_gib_per_process"] == m.proc_peaks


def test_nvml_errors_do_not_stop_sampling() -> None:
    class Broken:
        def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    m = bench.Monitor()
    m._sample_processes(Broken(), None, psutil)
    assert m.proc_peaks == {} and "gpu_mem_peak_gib_per_process" not in m.summary(0, 1)


def test_memory_peaks_are_split_into_start_up_and_run() -> None:
    """A capped run's peak must say whether it came while the engine started (loading, profiling,
    graph capture) or while pages ran: samples before t0 are start-up, [t0, t1] the run."""
    m = bench.Monitor()
    # (time, busy %, device GiB, cpu %): 0.5 before anything, 6.2 during start-up, 5.1 in the run
    m.samples = [
        (1.0, [0.0], [0.5], 1.0),
        (2.0, [10.0], [6.2], 5.0),
        (3.0, [90.0], [5.1], 9.0),
        (4.0, [80.0], [4.9], 9.0),
    ]
    m.proc_peaks = {"7 engine": 5.7}
    m.proc_samples = [(2.0, "7 engine", 5.7), (3.0, "7 engine", 4.6), (4.0, "7 engine", 4.4)]
    out = m.summary(3.0, 4.0)
    assert out["gpu_mem_first_sample_gib"] == 0.5
    assert out["gpu_mem_peak_start_up_gib"] == 6.2
    assert out["gpu_mem_peak_run_gib"] == 5.1
    assert out["gpu_mem_peak_gib"] == 6.2
    assert out["gpu_mem_peak_gib_per_process"] == {"7 engine": 5.7}
    assert out["gpu_mem_peak_gib_per_process_run"] == {"7 engine": 4.6}
    assert out["gpu_busy_fraction"] == 0.85


def test_busy_timeline_shows_ramps_the_mean_hides() -> None:
    m = bench.Monitor()
    t0 = 1000.0
    # 0-5 s idle (ramp), 5-10 s busy, 10-15 s no GPU sample, 15-20 s half busy; one sample before t0
    m.samples = [(t0 - 1, [100.0], [1.0], 0.0)]
    m.samples += [(t0 + t, [0.0], [1.0], 0.0) for t in (0.5, 2.5, 4.5)]
    m.samples += [(t0 + t, [100.0, 100.0], [1.0, 1.0], 0.0) for t in (5.5, 9.5)]
    m.samples += [(t0 + 12.0, [], [], 0.0)]
    m.samples += [(t0 + 16.0, [50.0], [1.0], 0.0)]
    out = m.summary(t0, t0 + 20)
    assert out["gpu_busy_timeline"] == {"bucket_s": 5, "busy": [0.0, 1.0, None, 0.5]}
    assert out["gpu_busy_fraction"] == round((0 + 0 + 0 + 100 + 100 + 50) / 6 / 100, 3)


def test_host_cpu_and_memory_timelines() -> None:
    """Host cores busy and host memory (used, shared) per bucket of the run: whether a ramp is
    CPU-bound, and whether pages held in shared memory or Ray's object store grow with the window."""
    m = bench.Monitor()
    t0 = 500.0
    ncpu = os.cpu_count() or 1
    m.samples = [
        (t0 - 1, [], [], 100.0),
        (t0 + 1, [], [], 50.0),
        (t0 + 2, [], [], 100.0),
        (t0 + 11, [], [], 25.0),
    ]
    m.host_mem = [(t0 - 1, 99.0, 9.0), (t0 + 1, 10.0, 2.0), (t0 + 3, 12.0, 4.0), (t0 + 11, 11.0, 1.0)]
    out = m.summary(t0, t0 + 12)
    assert out["host_cores_busy_timeline"] == [round(75.0 * ncpu / 100, 1), None, round(25.0 * ncpu / 100, 1)]
    assert out["host_mem_used_timeline_gib"] == [12.0, None, 11.0]  # the sample before t0 is start-up
    assert out["host_mem_shared_timeline_gib"] == [4.0, None, 1.0]
    assert (out["host_mem_used_peak_gib"], out["host_mem_shared_peak_gib"]) == (12.0, 4.0)


def test_sampler_records_host_memory() -> None:
    import time

    with bench.Monitor(period=0.01) as m:
        time.sleep(0.1)
    assert m.host_mem and all(used > 0 for _, used, _ in m.host_mem)
