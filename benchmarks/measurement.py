"""How every benchmark here measures and records: timing, peak memory, and the run's conditions.

The machine these numbers come from is shared, so each script writes, next to its CSV, a
``<name>_run.json`` with the command, the load average at start and end, the thread count and the
exact code measured (commit, and whether ``hf_performer/`` differed from it).

Results go to ``benchmarks/results/`` (and ``report.py``'s page to ``benchmarks/RESULTS.md``), or, when the
environment variable ``HF_PERFORMER_BENCHMARK_OUTPUT`` names a folder, to ``results/`` and ``RESULTS.md``
in it: a trial run (the tests run every script at toy sizes) then leaves the committed results alone.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("HF_PERFORMER_BENCHMARK_OUTPUT") or Path(__file__).resolve().parent) / "results"


def seconds_per_call(fn, repeats: int, slow_seconds: float = 5.0) -> float:
    """Best wall time of ``repeats`` calls after one warm-up.

    The best, not the median: on a shared machine other jobs only ever add time (and with 2 OpenMP
    threads on 2 busy cores a parallel region waits for both threads to be scheduled), so the
    fastest run is the closest to the op's own cost.  A warm-up slower than ``slow_seconds`` is
    itself the measurement: at that size the one-time costs a warm-up hides are negligible, and
    repeating would blow the run's time budget.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > slow_seconds:
        return first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_child(command: list[str], timeout: float, label: str) -> dict | None:
    """Runs a fresh-process measurement (``command``, a script's ``--child`` call) and returns the JSON object its
    last line of output prints; None, after saying why under ``label``, when it timed out or failed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {label}: timed out after {timeout} s", flush=True)
        return None
    if done.returncode:
        print(f"  {label}: failed ({done.returncode}) {done.stderr.strip()[-400:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages from ``/proc/loadavg``."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


class Run:
    """Conditions of one benchmark run; ``finish`` writes the CSV and ``<name>_run.json``.

    Use as ``run = Run("op_speed")`` at the start (records the load average then) and
    ``run.finish(rows)`` at the end.
    """

    def __init__(self, name: str):
        self.name = name
        RESULTS.mkdir(parents=True, exist_ok=True)  # scripts write plots there before ``finish``
        self.started = datetime.now(timezone.utc)
        self.load_at_start = load_average()
        diff = _git("diff", "HEAD", "--stat", "--", "hf_performer")
        self.info = dict(
            command="python " + " ".join(sys.argv),
            commit=_git("rev-parse", "--short", "HEAD"),
            hf_performer_uncommitted_changes=diff.splitlines()[-1] if diff else "none",
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu_count=len(os.sched_getaffinity(0)),
        )
        print(f"[{name}] {self.started:%Y-%m-%d %H:%M:%S} UTC, load average {self.load_at_start}, "
              f"{self.info['threads']} threads, commit {self.info['commit']} "
              f"(hf_performer changes: {self.info['hf_performer_uncommitted_changes']})", flush=True)

    def finish(self, rows: list[dict], csv_path: Path | None = None, **extra) -> Path:
        csv_path = csv_path or RESULTS / f"{self.name}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        finished = datetime.now(timezone.utc)
        record = dict(self.info, started_utc=f"{self.started:%Y-%m-%d %H:%M:%S}", finished_utc=f"{finished:%Y-%m-%d %H:%M:%S}",
                      minutes=round((finished - self.started).total_seconds() / 60, 1),
                      load_average_start=self.load_at_start, load_average_end=load_average(), **extra)
        (csv_path.parent / f"{self.name}_run.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"[{self.name}] wrote {csv_path} ({record['minutes']} min, load average at end {record['load_average_end']})")
        return csv_path
