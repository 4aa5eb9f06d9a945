#!/usr/bin/env python3
"""What the inside view costs a drawing's answer: POST /predict against POST /predict?layers=1.

Starts `mnist_recognition.py serve` on a free port of 127.0.0.1 (as serve_load.py does), then sends
N drawings as the page sends them (280x280 PNGs), each twice in a row on one keep-alive connection,
once plain and once with ?layers=1, alternating which goes first. It prints the median time of each,
the median of the paired differences, and the size of each answer; then it stops the server.

    python benchmarks/inside_latency.py --checkpoint outputs/lenet5_mnist.pt --requests 100
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import REPO, connect, drawing, start_server  # noqa: E402


def timed_post(connection, path, body):
    """(seconds, the answer's bytes) of one POST on an open connection."""
    started = time.perf_counter()
    connection.request("POST", path, body=body)
    response = connection.getresponse()
    answer = response.read()
    if response.status != 200:
        raise SystemExit(f"{path} answered {response.status}: {answer[:200]!r}")
    return time.perf_counter() - started, answer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "outputs" / "lenet5_mnist.pt", help="the model to serve"
    )
    parser.add_argument("--requests", type=int, default=100, help="drawings, each sent both ways")
    parser.add_argument("--max-seconds", type=float, default=120, help="stop after this long whatever is left")
    args = parser.parse_args()

    rng = random.Random(0)
    bodies = [drawing(rng.choice((0, 1, 7)), rng) for _ in range(20)]
    process, port = start_server(args.checkpoint)
    plain, layered, sizes = [], [], {}
    try:
        connection = connect(port)
        for body in bodies:  # warm-up: the first answers pay for lazy imports and allocations
            timed_post(connection, "/predict", body)
            timed_post(connection, "/predict?layers=1", body)
        deadline = time.monotonic() + args.max_seconds
        for index in range(args.requests):
            if time.monotonic() > deadline:
                break
            body = bodies[index % len(bodies)]
            order = ("/predict", "/predict?layers=1") if index % 2 == 0 else ("/predict?layers=1", "/predict")
            for path in order:
                seconds, answer = timed_post(connection, path, body)
                (layered if "layers" in path else plain).append(seconds)
                sizes[path] = len(answer)
        connection.close()
    finally:
        process.terminate()
        process.wait(timeout=30)

    differences = [with_layers - without for with_layers, without in zip(layered, plain)]
    print(f"{len(plain)} drawings, each answered plain and with ?layers=1 on one connection")
    print(f"plain:         median {1000 * statistics.median(plain):.2f} ms, answer {sizes['/predict'] / 1024:.1f} KiB")
    print(
        f"?layers=1:     median {1000 * statistics.median(layered):.2f} ms, "
        f"answer {sizes['/predict?layers=1'] / 1024:.1f} KiB"
    )
    print(f"added by the layers: median {1000 * statistics.median(differences):.2f} ms a drawing")


if __name__ == "__main__":
    main()
