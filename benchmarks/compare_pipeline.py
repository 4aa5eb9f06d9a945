#!/usr/bin/env python3
"""Time the classic DataLoader pipeline against mnist_recognition.py (its original recipe), side by side.

Each pair trains both pipelines from the same seed for --epochs epochs, in alternating order,
each in a fresh process, and prints the seconds per epoch, the test accuracies and the ratio.
Only the training epochs are timed (not start-up, data loading or evaluation).

    python benchmarks/compare_pipeline.py --pairs 3
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_original(epochs, seed, data_dir):
    """The seed program's pipeline, as it was: per-sample PIL ToTensor + Normalize through a
    DataLoader with 2 workers, the plain LeNet-5 module, and per-batch loss.item() and accuracy
    bookkeeping with a tqdm bar. Returns (seconds per epoch, test accuracy)."""
    import torch
    import torch.nn as nn
    from loguru import logger
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from tqdm import tqdm

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Conv2d(6, 16, kernel_size=5),
                nn.ReLU(),
                nn.AvgPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
            )

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(data_dir, train=True, download=False, transform=transform)
    test_set = datasets.MNIST(data_dir, train=False, download=False, transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=2)
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False, num_workers=2)
    model = LeNet5().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = []
    for epoch in range(epochs):
        started = time.perf_counter()
        running_loss, correct, total = 0.0, 0, 0
        for i, (images, labels) in enumerate(tqdm(train_loader, desc=f"Epoch {epoch + 1}"), 1):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            if i % 200 == 0:
                logger.info(
                    f"[Epoch {epoch + 1}, Batch {i}] loss: {running_loss / 200:.3f} "
                    f"accuracy: {100 * correct / total:.2f} %"
                )
                running_loss, correct, total = 0.0, 0, 0
        seconds.append(time.perf_counter() - started)
    correct = 0
    model.eval()
    with torch.no_grad():
        for images, labels in test_loader:
            correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
    return seconds, 100 * correct / len(test_set)


def run_original(epochs, seed, data_dir):
    output = subprocess.run(
        [sys.executable, __file__, "--worker", "--epochs", str(epochs), "--seed", str(seed), "--data-dir", data_dir],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    return result["seconds"], result["accuracy"]


def run_program(epochs, seed, data_dir):
    with tempfile.TemporaryDirectory() as out_dir:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "mnist_recognition.py"),
                "--epochs",
                str(epochs),
                "--seed",
                str(seed),
                "--data-dir",
                data_dir,
                "--out-dir",
                out_dir,
                "--no-download",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    return [epoch["seconds"] for epoch in metrics["epochs"]], metrics["eval_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--pairs", type=int, default=3, help="how many dataloader/program pairs to time")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST/raw/")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds, accuracy = train_original(args.epochs, args.seed, args.data_dir)
        print(json.dumps({"seconds": seconds, "accuracy": accuracy}))
        return

    runners = {"dataloader": run_original, "program": run_program}
    per_epoch = {name: [] for name in runners}
    print(f"{'pair':>4}  {'pipeline':<10} {'s/epoch':>8}  {'test acc %':>10}")
    for pair in range(args.pairs):
        order = ["dataloader", "program"] if pair % 2 == 0 else ["program", "dataloader"]
        for name in order:
            seconds, accuracy = runners[name](args.epochs, args.seed, args.data_dir)
            per_epoch[name].append(statistics.median(seconds))
            print(f"{pair + 1:>4}  {name:<10} {per_epoch[name][-1]:>8.2f}  {accuracy:>10.2f}", flush=True)
    ratios = [o / p for o, p in zip(per_epoch["dataloader"], per_epoch["program"])]
    print(
        f"median s/epoch: dataloader {statistics.median(per_epoch['dataloader']):.2f}, "
        f"program {statistics.median(per_epoch['program']):.2f}"
    )
    print(f"speed-up per pair: {', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
