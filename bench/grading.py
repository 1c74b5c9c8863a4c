"""
bench/grading.py: what grading a program costs (sandbox.py), one at a time and with the pool.

    python bench/grading.py [--rounds 3] [--workers 0]

Grades the 51 reference solutions of tests/code_problems.py (real HumanEval/MBPP-style programs,
2-5 tests each) `rounds` times: first one program at a time (seconds per program: mean, p50, p95),
then all of them through `run_code_tests_batch` (programs per second). Run it on a quiet machine
(../shared/tools/quiet-check): two processes on 2 cores slow each other down many times over.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import sandbox  # noqa: E402
from code_problems import PROBLEMS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="pool size (0 = cores, at most 8)")
    args = ap.parse_args()
    jobs = [{"code": p["solution"], "tests": p["tests"], "entry_point": p["entry_point"]} for p in PROBLEMS]
    print(f"sandbox mode: {sandbox.check_sandbox()}, limits: {'cgroup' if sandbox.Cgroup.available() else 'rlimit'}, "
          f"{os.cpu_count()} cores, {len(jobs)} programs x {args.rounds} rounds")
    times, wrong = [], 0
    for _ in range(args.rounds):
        for j in jobs:
            t = time.perf_counter()
            r, _ = sandbox.run_code_tests(j["code"], j["tests"], j["entry_point"])
            times.append(time.perf_counter() - t)
            wrong += r != 1.0
    times.sort()
    p95 = times[int(0.95 * (len(times) - 1))]
    print(f"one at a time: mean {statistics.mean(times):.3f} s, p50 {statistics.median(times):.3f} s, "
          f"p95 {p95:.3f} s per program ({wrong} not scored 1)")
    workers = args.workers or min(8, os.cpu_count() or 1)
    rates = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        res = sandbox.run_code_tests_batch(jobs, workers)
        rates.append(len(jobs) / (time.perf_counter() - t))
        wrong += sum(r != 1.0 for r, _ in res)
    print(f"pool of {workers}: {statistics.median(rates):.1f} programs/s (min {min(rates):.1f}, max {max(rates):.1f})")
    if wrong:
        sys.exit(f"{wrong} reference solutions did not score 1")


if __name__ == "__main__":
    main()
