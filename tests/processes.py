"""Processes by /proc, for tests that start Ray themselves and must stop only what they started
(never `ray stop --force` or a kill by name: other Ray clusters may run on the host)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (by parent links, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := stat(int(entry.name))) is not None:
            children.setdefault(info[0], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    info = stat(pid)
    return info is not None and info[1] != "Z"  # a zombie has exited: only its parent's reaping is left


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_naming(text: str) -> set[int]:
    """Live processes whose command line contains ``text`` (a Ray session or temp dir: raylet,
    gcs_server, dashboard, workers)."""
    return {int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and text in cmdline(int(e.name)) and alive(int(e.name))}


def open_paths(pid: int) -> list[str]:
    """The paths of a process's open files (empty when it is gone or not ours to read)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    paths = []
    for fd in fds:
        try:
            paths.append(os.readlink(fd))
        except OSError:
            pass
    return paths


def processes_using(text: str) -> set[int]:
    """Live processes other than this one whose command line or any open file's path contains
    ``text``: Ray's agents rename themselves (``ray::DashboardAgent``) but keep their session's
    log files open."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        if alive(pid) and (text in cmdline(pid) or any(text in path for path in open_paths(pid))):
            found.add(pid)
    return found


def stop_processes_naming(text: str, grace: float = 10.0) -> set[int]:
    """SIGTERM every live process whose command line or open files name ``text`` (a cluster's
    --temp-dir: :func:`processes_using` also finds Ray's self-renamed agents), SIGKILL what is
    left after ``grace`` seconds; returns the pids that were signalled."""
    signalled: set[int] = set()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = processes_using(text)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        signalled |= pids
        deadline = time.monotonic() + wait
        while processes_using(text) and time.monotonic() < deadline:
            time.sleep(0.2)
    return signalled
