"""Process statistics from ``/proc`` (Linux) and a sampler of the scoring processes' memory.

Used by ``diffin bench scale``: peak resident memory (``VmHWM``) and RSS of the driver and of
every scoring actor, their CPU seconds, sampled from outside the processes while a run goes on.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.io.atomic import write_json_atomic
from pipeline.runtime.executor import stage_actor_pids

MB = 1024 * 1024


def proc_memory(pid: int | str = "self") -> dict[str, int] | None:
    """``VmRSS`` and ``VmHWM`` (bytes) of a process from ``/proc``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out if len(out) == 2 else None


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5); True if done."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_start_time(pid: int) -> float | None:
    """When a process started (seconds since the epoch), from ``/proc/<pid>/stat``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
    except (OSError, StopIteration, IndexError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime


def process_cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15


@dataclass
class _Peak:
    """Running peaks of one process."""

    hwm: int = 0
    max_rss: int = 0
    last_rss: int = 0
    cpu_s: float = 0.0
    alive: bool = True

    def update(self, mem: dict[str, int]) -> None:
        self.hwm = max(self.hwm, mem["VmHWM"])
        self.max_rss = max(self.max_rss, mem["VmRSS"])
        self.last_rss = mem["VmRSS"]

    def as_mb(self) -> dict[str, float]:
        return {"hwm_mb": round(self.hwm / MB, 1), "max_rss_mb": round(self.max_rss / MB, 1)}


class RssSampler(threading.Thread):
    """Polls the driver's and the scoring actors' memory and the pairs scored so far.

    ``pairs_done()`` counts scored pairs; when it first reaches each of ``checkpoint_pairs``
    the running peaks are recorded (``at_checkpoints[n]``). ``find_actors()`` returns actor pids;
    it is called every few seconds (each pid, once seen, is polled until it is gone). The
    timeline gets a point whenever the pair count changes and every ``timeline_every`` s;
    with ``progress_path`` the peaks so far are then also written there (so a run stopped
    early still leaves its measurements).
    """

    def __init__(self, pairs_done: Callable[[], int], checkpoint_pairs: Sequence[int], interval: float = 0.5,
                 find_actors: Callable[[], list[int]] = stage_actor_pids, timeline_every: float = 30.0,
                 progress_path: Path | None = None, expected_actors: int = 1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pairs_done, self.checkpoint_pairs = pairs_done, tuple(sorted(checkpoint_pairs))
        self.interval, self.find_actors, self.timeline_every = interval, find_actors, timeline_every
        self.progress_path, self.expected_actors = progress_path, expected_actors
        self.driver = _Peak()
        self.actors: dict[int, _Peak] = {}
        self.actor_started: dict[int, float | None] = {}
        self.first_actor_time: float | None = None
        self.at_checkpoints: dict[int, dict[str, Any]] = {}
        self.timeline: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()
        self._start = time.perf_counter()
        self._pairs = 0
        self._last_point = -math.inf

    def run(self) -> None:
        next_lookup = 0.0
        while not self._stop_event.is_set():
            now = time.perf_counter()
            if now >= next_lookup:
                self._lookup_actors()
                known = sum(p.alive for p in self.actors.values())
                next_lookup = now + (10 if known >= self.expected_actors else 2) * self.interval
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        """Take a last sample and end the thread."""
        self._stop_event.set()
        self.join()
        self.sample()

    def _lookup_actors(self) -> None:
        try:
            pids = self.find_actors()
        except Exception as exc:  # the state API can be briefly unavailable; keep sampling
            if len(self.errors) < 5:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        for pid in pids:
            if pid not in self.actors:
                self.actors[pid] = _Peak()
                self.actor_started[pid] = process_start_time(pid)
                if self.first_actor_time is None:
                    self.first_actor_time = time.perf_counter()

    def sample(self) -> None:
        """Poll every process once; record the checkpoint and the timeline when pairs change."""
        mem = proc_memory()
        if mem:
            self.driver.update(mem)
        for pid, peak in self.actors.items():
            mem, cpu = proc_memory(pid), process_cpu_seconds(pid)
            if mem and cpu is not None:
                peak.update(mem)
                peak.cpu_s = cpu
            else:
                peak.alive = False
        pairs, now = self.pairs_done(), time.perf_counter()
        changed = pairs != self._pairs
        self._pairs = pairs
        for n in self.checkpoint_pairs:
            if n not in self.at_checkpoints and pairs >= n:
                self.at_checkpoints[n] = self.snapshot()
        if changed or now - self._last_point >= self.timeline_every:
            self._last_point = now
            self.timeline.append({"t_s": round(now - self._start, 1), "pairs": pairs,
                                  "driver_rss_mb": round(self.driver.last_rss / MB, 1),
                                  "actor_rss_mb": {str(pid): round(p.last_rss / MB, 1)
                                                   for pid, p in self.actors.items() if p.alive}})
            self._write_progress()

    def _write_progress(self) -> None:
        if self.progress_path is not None:
            write_json_atomic(self.progress_path, {
                "at_checkpoints": {str(n): v for n, v in self.at_checkpoints.items()},
                "now": self.snapshot(), "timeline": self.timeline, "errors": self.errors})

    def snapshot(self) -> dict[str, Any]:
        """The running peaks now, per role and per actor process, and the actors' CPU seconds.

        ``pairs_per_actor_cpu_s`` counts only finished shards against all CPU spent (set-up
        and shards in flight included): exact at the end, an undercount at checkpoints.
        """
        actors = {str(pid): p.as_mb() for pid, p in self.actors.items()}
        score_s = time.perf_counter() - self.first_actor_time if self.first_actor_time else None
        cpu = sum(p.cpu_s for p in self.actors.values())
        return {"pairs": self._pairs, "seconds_since_actors_started": round(score_s, 1) if score_s else None,
                "actor_cpu_s": round(cpu, 1),
                "pairs_per_actor_cpu_s": round(self._pairs / cpu, 2) if cpu else None,
                "driver": self.driver.as_mb(), "actors": actors,
                "actor_hwm_max_mb": max((a["hwm_mb"] for a in actors.values()), default=None),
                "actor_max_rss_max_mb": max((a["max_rss_mb"] for a in actors.values()), default=None)}
