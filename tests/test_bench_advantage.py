"""The advantage benchmark (benchmarks/bench_advantage.py): its run end to end at a tiny size, and
``--keep-freed-memory``, which takes glibc's choice of fresh or reused pages out of the timings."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from bench_modules import BENCHMARKS

SCRIPT = BENCHMARKS / "bench_advantage.py"

# RSS change when a touched 64 MiB tensor is freed, in a fresh interpreter (MiB).
_FREE_AND_READ_RSS = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {benchmarks!r})
    import bench_advantage
    if {keep}:
        bench_advantage.keep_freed_memory()
    def rss():
        return int(re.search(r"^VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
    blocks = [torch.ones(2**20) for _ in range(16)]  # 16 x 4 MiB, each its own block
    before = rss()
    del blocks
    print(before - rss())
    """
)


def _rss_freed_mib(keep: bool) -> float:
    code = _FREE_AND_READ_RSS.format(benchmarks=str(BENCHMARKS), keep=keep)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def test_keep_freed_memory_keeps_freed_blocks_resident_where_glibc_would_hand_them_back():
    assert _rss_freed_mib(keep=False) > 48  # glibc's default: 4 MiB blocks are mapped, and unmapped when freed
    assert _rss_freed_mib(keep=True) < 16  # fixed thresholds: they stay in the heap for the next allocation


def test_a_tiny_run_times_every_estimator_and_records_the_allocator_setting(tmp_path):
    out = tmp_path / "advantage.json"
    size = ["--batch", "16", "--steps", "3", "--length", "48", "--group", "4", "--repeats", "1", "--threads", "1"]
    subprocess.run([sys.executable, str(SCRIPT), *size, "--no-memory", "--keep-freed-memory", "--out", str(out)],
                   capture_output=True, text=True, check=True)
    report = json.loads(out.read_text())
    assert report["keep_freed_memory"] is True and report["batch"] == 16
    timed = {row["estimator"]: row for row in report["results"]}
    assert timed["steppo (explicit step_ids)"]["baseline"] == "verl gae (token loop)"
    assert all(row["seconds"] > 0 for row in timed.values())
