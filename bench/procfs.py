"""What a server process costs, read from /proc: CPU seconds (utime + stime) and resident memory (VmRSS).

A process's /proc/PID/stat already sums all its threads. Its live descendants are counted too, so a
server that runs its work in child processes (PyTriton's tritonserver, hotpath's current worker
processes) is charged for them; a single-process server is unaffected.
"""

from __future__ import annotations

import os
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): field 3 is first."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` followed by its live descendants (found by parent pid, so a double fork still counts)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
            except (OSError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent and child not in tree]
        tree += children
        frontier += children
    return tree


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """utime + stime of `pid` (all its threads) and, unless told not to, of its live descendants."""
    total_ticks = 0
    for member in process_tree(pid) if descendants else [pid]:
        try:
            fields = _stat_fields(member)
        except OSError:
            continue  # it exited between the listing and the read
        total_ticks += int(fields[11]) + int(fields[12])
    return total_ticks / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` alone, in bytes (0 for a process with no memory map, such as a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(pid: int) -> dict:
    """VmRSS of `pid` and the sum over it and its live descendants, in MiB. The sum counts pages the
    processes share once per process, so it is an upper bound for a multi-process server."""
    tree_bytes = 0
    tree = process_tree(pid)
    for member in tree:
        try:
            tree_bytes += rss_bytes(member)
        except OSError:
            continue
    return {"rss_mib": rss_bytes(pid) / 2**20, "tree_rss_mib": tree_bytes / 2**20, "processes": len(tree)}
