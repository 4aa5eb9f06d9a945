"""`python mnist_recognition.py ARGS`, except that the run waits after one batch until told to go on.

    python tests/paused_run.py EPOCH BATCH ARGS...

After batch BATCH of epoch EPOCH (both counted from 1) it prints "paused at epoch E, batch B" to
stderr and waits for a line on stdin. The signal tests send their real signal while it waits
there, so the moment the signal lands is certain instead of a race with the clock.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist_recognition as app  # noqa: E402


def pause_after(epoch, batch):
    record = app.Progress.record_batch

    def record_then_wait(progress, index, loss_sum, correct):
        record(progress, index, loss_sum, correct)
        if (progress.epoch + 1, index + 1) == (epoch, batch):
            print(f"paused at epoch {epoch}, batch {batch}", file=sys.stderr, flush=True)
            sys.stdin.readline()  # a signal handled meanwhile runs here; the read then goes on

    app.Progress.record_batch = record_then_wait


if __name__ == "__main__":
    pause_after(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(app.main(sys.argv[3:]))
