"""Peak memory per phase of a run (training, base evaluation, tuned evaluation).

CUDA: `torch.cuda.max_memory_allocated` (tensors held by the caching allocator), reset by
`torch.cuda.reset_peak_memory_stats` when a phase starts. CPU: the process's peak resident set size, VmHWM in
/proc/self/status, reset to the current RSS when a phase starts by writing "5" to /proc/self/clear_refs (Linux >= 4.0);
where that is not possible, `getrusage`'s max RSS, which is the peak since the process started and cannot be reset
(`how` says which). RSS counts everything the process holds (the model, Python, libraries), not just tensors.

    peaks = PhasePeaks("cpu")
    with peaks.phase("train"):
        ...
    peaks.record()   # {"train": bytes, ..., "how": "..."}
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["PhasePeaks", "peak_bytes", "reset_peak"]

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def _cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _vm_hwm() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak(device: str) -> bool:
    """Start a new peak measurement; False when the peak cannot be reset here (CPU without clear_refs)."""
    if _cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open(_CLEAR, "w") as f:
            f.write("5")
        return _vm_hwm() is not None
    except OSError:
        return False


def peak_bytes(device: str) -> int:
    """The peak since the last `reset_peak` (CUDA: allocated tensors; CPU: resident set), 0 when unknown."""
    if _cuda(device):
        import torch

        return int(torch.cuda.max_memory_allocated())
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except (ImportError, OSError):
        return 0


class PhasePeaks:
    """Peak memory of named phases, each measured from its own start."""

    def __init__(self, device: str):
        self.device = str(device)
        self.peaks: dict[str, int] = {}
        self.resettable = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.resettable = reset_peak(self.device) and self.resettable
        try:
            yield
        finally:
            self.peaks[name] = peak_bytes(self.device)

    def record(self) -> dict:
        if _cuda(self.device):
            how = "torch.cuda.max_memory_allocated, reset per phase"
        elif self.resettable:
            how = "peak resident set (VmHWM), reset per phase"
        else:
            how = "peak resident set since the process started (getrusage), not resettable here"
        return {**self.peaks, "how": how}
