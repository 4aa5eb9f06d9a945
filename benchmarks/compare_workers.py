#!/usr/bin/env python3
"""compare's worker processes (one torch thread each) against the same runs one after another in one
process with every thread, side by side.

Both train the same runs: the baseline and each --vary variant with seeds 0..N-1 of --recipe fast on
--train-limit images, measured on a 10,000-image validation split. (A) is `compare --workers W`;
(B) is a process that runs those plain training runs one after another with torch's default threads
(with --no-figures, as compare's runs are).
Each is a fresh process into a fresh folder, alternating A and B, --repeats times; it prints each
wall time, their medians and the ratio B / A.

    python benchmarks/compare_workers.py --seeds 3 --train-limit 20000 --repeats 3
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARY = ["pool=max"]

ONE_AFTER_ANOTHER = """
import sys
sys.path.insert(0, {repo!r})
import mnist_recognition as app
for flags in {runs!r}:
    assert app.main(flags) == 0
"""


def timed(command):
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    args = parser.parse_args()

    base = ["--recipe", "fast", "--train-limit", str(args.train_limit), "--validation", "10000", "--no-download",
            "--device", "cpu", "--data-dir", str(args.data_dir)]  # fmt: skip
    variants = [[], ["--pool", "max"]]
    parallel, serial = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            out = Path(scratch) / f"compare-{repeat}"
            parallel.append(
                timed(
                    [
                        sys.executable,
                        "mnist_recognition.py",
                        "compare",
                        *base,
                        "--vary",
                        *VARY,
                        "--seeds",
                        str(args.seeds),
                        "--workers",
                        str(args.workers),
                        "--out-dir",
                        str(out),
                    ]
                )  # fmt: skip
            )
            runs = [
                [
                    *base,
                    *flags,
                    "--seed",
                    str(seed),
                    "--no-figures",
                    "--out-dir",
                    str(Path(scratch) / f"plain-{repeat}-{index}-{seed}"),
                ]
                for index, flags in enumerate(variants)
                for seed in range(args.seeds)
            ]
            serial.append(timed([sys.executable, "-c", ONE_AFTER_ANOTHER.format(repo=str(REPO), runs=runs)]))
            print(f"repeat {repeat + 1}: compare --workers {args.workers} {parallel[-1]:.1f} s, "
                  f"one process {serial[-1]:.1f} s")  # fmt: skip
    runs_count = len(variants) * args.seeds
    print(f"{runs_count} runs of --recipe fast --train-limit {args.train_limit}, medians of {args.repeats}:")
    print(f"  (A) compare --workers {args.workers}, one thread each: {statistics.median(parallel):.1f} s")
    print(f"  (B) one process, {os.cpu_count()} cores, torch's default threads: {statistics.median(serial):.1f} s")
    print(f"  B / A: {statistics.median(serial) / statistics.median(parallel):.2f}x")


if __name__ == "__main__":
    main()
