#!/usr/bin/env python3
"""Teaching a model one person's handwriting: collect, fine-tune, measure, for simulated writers.

    python benchmarks/personal_handwriting.py --checkpoint outputs/lenet5_mnist.pt

Each writer is one of Debian's handwriting fonts (fonts-humor-sans, fonts-dkg-handwriting,
fonts-femkeklaver, fonts-breip, fonts-rufscript, fonts-dancingscript): a consistent style of its
own, with small random changes per digit (size, slant, rotation, position, ink and paper), dark on
light like a drawing or a scan. For each writer, as a person would:

1. `serve --collect` runs, and --collect images per class are sent to it through POST /examples;
2. `finetune` learns them (it holds out a share of them itself, and logs the test set's accuracy
   before and after);
3. `evaluate --images` reads --unseen other images per class of the same writer, with the model
   before and after.

Printed: each writer's accuracy on its unseen digits before and after, the test set's before and
after, and finetune's wall seconds. Everything runs as the user runs it: commands in processes of
their own, the server on 127.0.0.1 only, every request loop bounded.
"""

import argparse
import http.client
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "mnist_recognition.py"
WRITERS = {
    "Humor Sans": "/usr/share/fonts/truetype/humor-sans/Humor-Sans.ttf",
    "dkg": "/usr/share/fonts/truetype/fifthhorseman/dkg.ttf",
    "Femke Klaver": "/usr/share/fonts/truetype/femkeklaver/femkeklaver.ttf",
    "Breip": "/usr/share/fonts/truetype/breip/Breip.ttf",
    "Rufscript": "/usr/share/fonts/truetype/rufscript/Rufscript010.ttf",
    "Dancing Script": "/usr/share/fonts/opentype/dancingscript/DancingScript-Regular.otf",
}


def written(font_path, digit, rng):
    """One digit as this writer writes it, with the small changes of one instance: PNG bytes."""
    font = ImageFont.truetype(font_path, size=int(rng.integers(120, 170)))
    paper, ink = int(rng.integers(225, 256)), int(rng.integers(0, 60))
    canvas = Image.new("L", (280, 280), paper)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    shift = rng.integers(-20, 21, size=2)
    draw.text(
        ((280 - right - left) / 2 + shift[0], (280 - bottom - top) / 2 + shift[1]), str(digit), fill=ink, font=font
    )
    slant = rng.uniform(-0.15, 0.15)
    canvas = canvas.transform(
        canvas.size,
        Image.Transform.AFFINE,
        (1, slant, -slant * 140, 0, 1, 0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=paper,
    )
    canvas = canvas.rotate(rng.uniform(-6, 6), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def write_unseen(folder, font_path, per_class, rng):
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True)
        for index in range(per_class):
            (folder / str(digit) / f"{index}.png").write_bytes(written(font_path, digit, rng))


def collect(checkpoint, folder, font_path, per_class, rng):
    """Start `serve --collect folder`, send per_class drawings of each digit to POST /examples, stop it."""
    server = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--port",
            "0",
            "--collect",
            str(folder),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if not line:
                break
            if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                port = int(match[1])
        if port is None:
            raise RuntimeError("serve did not start")
        for digit in range(10):
            for _ in range(per_class):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("POST", f"/examples?label={digit}", body=written(font_path, digit, rng))
                response = connection.getresponse()
                response.read()
                connection.close()
                if response.status != 201:
                    raise RuntimeError(f"POST /examples answered {response.status}")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def run(*args):
    """Run a command of the script; returns its log (stderr)."""
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:1]))} failed:\n{result.stderr[-2000:]}")
    return result.stderr


def accuracy_on(checkpoint, folder, out_dir):
    run("evaluate", "--checkpoint", checkpoint, "--images", folder, "--out-dir", out_dir)
    return json.loads((out_dir / "metrics.json").read_text())["eval_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "outputs" / "lenet5_mnist.pt")
    parser.add_argument("--collect", type=int, default=10, help="images per class collected through the page's API")
    parser.add_argument("--unseen", type=int, default=50, help="other images per class, measured on")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("finetune_flags", nargs="*", help="more flags for finetune (after --)")
    args = parser.parse_args()

    writers = {name: path for name, path in WRITERS.items() if Path(path).is_file()}
    for name in sorted(set(WRITERS) - set(writers)):
        print(f"left out, not installed: {name} ({WRITERS[name]})")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, font_path) in enumerate(writers.items()):
            work = Path(scratch) / str(index)
            rng = np.random.default_rng(index)
            write_unseen(work / "unseen", font_path, args.unseen, rng)
            collect(args.checkpoint, work / "collected", font_path, args.collect, rng)
            started = time.perf_counter()
            log = run(
                "finetune",
                "--checkpoint",
                args.checkpoint,
                "--images",
                work / "collected",
                "--data-dir",
                args.data_dir,
                "--no-download",
                "--out-dir",
                work / "tuned",
                *args.finetune_flags,
            )
            seconds = time.perf_counter() - started
            tests = re.search(r"test images: ([\d.]+) % before, ([\d.]+) % after", log)
            held = re.search(r"held-out images of yours: ([\d.]+) % before, ([\d.]+) % after", log)
            before = accuracy_on(args.checkpoint, work / "unseen", work / "before")
            after = accuracy_on(work / "tuned" / "lenet5_mnist.pt", work / "unseen", work / "after")
            rows.append(
                (name, before, after, float(held[1]), float(held[2]), float(tests[1]), float(tests[2]), seconds)
            )
            print(
                f"{name:<16} unseen {before:6.2f} -> {after:6.2f} %   held out {held[1]} -> {held[2]} %   "
                f"test {tests[1]} -> {tests[2]} %   finetune {seconds:.1f} s",
                flush=True,
            )
    columns = ("unseen before", "unseen after", "held out before", "held out after", "test before", "test after")
    means = ", ".join(
        f"{column} {statistics.mean(row[k + 1] for row in rows):.2f} %" for k, column in enumerate(columns)
    )
    print(f"\nmean over {len(rows)} writers: {means}; finetune median {statistics.median(r[7] for r in rows):.1f} s")


if __name__ == "__main__":
    main()
