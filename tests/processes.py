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


def stop_processes_naming(text: str, grace: float = 10.0) -> set[int]:
    """SIGTERM every live process whose command line contains ``text``, SIGKILL what is left after
    ``grace`` seconds; returns the pids that were signalled."""
    signalled: set[int] = set()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = processes_naming(text)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        signalled |= pids
        deadline = time.monotonic() + wait
        while processes_naming(text) and time.monotonic() < deadline:
            time.sleep(0.2)
    return signalled
