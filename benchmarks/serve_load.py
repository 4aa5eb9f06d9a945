#!/usr/bin/env python3
"""Load on `mnist_recognition.py serve`: K clients on 127.0.0.1, N requests, then it stops.

Starts the server on a free port of 127.0.0.1 with the checkpoint given, and runs K client
threads, each on its own keep-alive connection, until N requests have been answered. The bodies
are a fixed mix: drawings as the page sends them (a 280x280 PNG of a digit drawn with its pen),
photos (a 640x480 JPEG of a digit on uneven paper, with noise) and bad bodies (text, a blank
canvas). It prints good answers per second, the p50 and p99 latency of all requests, errors
(5xx answers or dropped connections), and the server's resident memory before and after.

    python benchmarks/serve_load.py --checkpoint outputs/lenet5_mnist.pt --clients 8 --requests 10000
"""

import argparse
import http.client
import io
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent


def drawing(digit, rng):
    """A digit as the page's canvas sends it: black strokes 28 px wide on white, 280x280."""
    image = Image.new("RGB", (280, 280), "white")
    pen = ImageDraw.Draw(image)
    top, bottom = rng.randint(30, 60), rng.randint(220, 250)
    left, right = rng.randint(70, 100), rng.randint(180, 210)
    shapes = {
        0: [
            (left, (top + bottom) / 2),
            ((left + right) / 2, top),
            (right, (top + bottom) / 2),
            ((left + right) / 2, bottom),
            (left, (top + bottom) / 2),
        ],
        1: [((left + right) / 2 + 8, top), ((left + right) / 2 - 8, bottom)],
        7: [(left, top), (right, top), ((left + right) / 2, bottom)],
    }
    points = shapes[digit]
    pen.line(points, fill="black", width=28, joint="curve")
    for x, y in (points[0], points[-1]):
        pen.ellipse((x - 14, y - 14, x + 14, y + 14), fill="black")
    return png(image)


def photo(digit, rng):
    """A digit photographed on paper: larger, grey ink, uneven light, noise, JPEG."""
    image = Image.open(io.BytesIO(drawing(digit, rng))).convert("L").resize((300, 300))
    page = Image.new("L", (640, 480), 225)
    page.paste(image, (rng.randint(50, 300), rng.randint(20, 160)))
    pixels = np.asarray(page, dtype=np.float32)
    noise = np.random.default_rng(rng.randint(0, 99)).normal(0, 6, pixels.shape)
    pixels = 0.55 * pixels + 60 + np.linspace(0, 40, 640)[None, :] + noise  # grey ink, light from one side
    page = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    buffer = io.BytesIO()
    page.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bodies(seed=0):
    """(kind, body, the status it should get): 70 % drawings, 20 % photos, 10 % bad bodies."""
    rng = random.Random(seed)
    mix = [("drawing", drawing(rng.choice((0, 1, 7)), rng), 200) for _ in range(35)]
    mix += [("photo", photo(rng.choice((0, 1, 7)), rng), 200) for _ in range(10)]
    mix += [("bad", b"this is not an image", 400) for _ in range(3)]
    mix += [("bad", png(Image.new("RGB", (280, 280), "white")), 422) for _ in range(2)]
    return mix


def resident_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def start_server(checkpoint):
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "mnist_recognition.py"),
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 60
    for line in process.stderr:
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep draining
            return process, int(match.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit(f"the server did not start: {line}")


def connect(port):
    """A keep-alive connection that sends at once, as browsers' do (TCP_NODELAY)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def client(port, requests, mix, results, deadline):
    """Send bodies from `mix` in turn until `requests` is used up or the deadline passes."""
    connection = connect(port)
    rng = random.Random(threading.get_ident())
    while time.monotonic() < deadline:
        with requests["lock"]:
            if requests["left"] == 0:
                break
            requests["left"] -= 1
        kind, body, expected = mix[rng.randrange(len(mix))]
        started = time.perf_counter()
        try:
            connection.request("POST", "/predict", body=body)
            response = connection.getresponse()
            response.read()
            status = response.status
            if response.will_close:
                connection.close()
                connection = connect(port)
        except (OSError, http.client.HTTPException):
            status = None  # dropped
            connection.close()
            connection = connect(port)
        results.append((kind, status, expected, time.perf_counter() - started))
    connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "outputs" / "lenet5_mnist.pt", help="the model to serve"
    )
    parser.add_argument("--clients", type=int, default=8, help="clients at the same time")
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop after this long whatever is left")
    args = parser.parse_args()

    mix = bodies()
    process, port = start_server(args.checkpoint)
    try:
        warm = {"left": 50, "lock": threading.Lock()}
        client(port, warm, [entry for entry in mix if entry[0] != "bad"], [], time.monotonic() + 60)
        memory_before = resident_mb(process.pid)
        requests, results = {"left": args.requests, "lock": threading.Lock()}, []
        started = time.perf_counter()
        deadline = time.monotonic() + args.max_seconds
        threads = [
            threading.Thread(target=client, args=(port, requests, mix, results, deadline)) for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        memory_after = resident_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)

    latencies = sorted(result[3] for result in results)
    good = sum(1 for kind, status, expected, _ in results if status == 200)
    as_expected = sum(1 for kind, status, expected, _ in results if status == expected)
    errors = sum(1 for kind, status, expected, _ in results if status is None or status >= 500)
    print(
        f"{len(results)} requests from {args.clients} clients in {elapsed:.1f} s "
        f"({sum(r[0] == 'drawing' for r in results)} drawings, {sum(r[0] == 'photo' for r in results)} photos, "
        f"{sum(r[0] == 'bad' for r in results)} bad bodies)"
    )
    print(f"good answers per second: {good / elapsed:.0f} ({good} answers of 200)")
    print(
        f"latency: p50 {1000 * statistics.median(latencies):.1f} ms, "
        f"p99 {1000 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms"
    )
    print(f"answers with the expected status: {as_expected} of {len(results)}; errors (5xx or dropped): {errors}")
    print(
        f"server memory: {memory_before:.1f} MB before, {memory_after:.1f} MB after "
        f"({memory_after - memory_before:+.1f} MB)"
    )


if __name__ == "__main__":
    main()
