#!/usr/bin/env bash
# Check the CUDA path on one GPU and print a table: the environment; the default run's wall time,
# training seconds, seconds per epoch and accuracy; whether two runs give identical weights;
# whether --resume after Ctrl-C is bit-exact; torchrun with one process (NCCL); evaluate and
# predict on the GPU against the CPU; the fast recipe. About 2-3 minutes on an H100-class GPU.
#
#   bash benchmarks/gpu_check.sh            # needs ./venv (bash run.sh --help makes it) and data/MNIST/raw/
#
# CHECK_DEVICE=cpu CHECK_EPOCHS=1 runs the same checks on the CPU, to test this script itself.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
python=venv/bin/python
device=${CHECK_DEVICE:-cuda}
epochs=${CHECK_EPOCHS:-10}
if [ "$device" = cuda ] && ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA GPU is available here (torch.cuda.is_available() is False); nothing was run." >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
train=("$python" mnist_recognition.py --device "$device" --epochs "$epochs" --no-download)

seconds() {  # seconds COMMAND...: run it quietly, print its wall time; on failure show its log and stop
    local start; start=$(date +%s.%N)
    if ! "$@" > "$work/last.log" 2>&1; then
        echo "gpu_check: this failed: $*" >&2; tail -n 20 "$work/last.log" >&2; return 1
    fi
    awk -v start="$start" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }'
}
metric() { "$python" -c "import json, sys; m = json.load(open(sys.argv[1])); print($2)" "$1/metrics.json"; }
same_run() {  # same_run DIR DIR: identical weights and per-epoch numbers?
    "$python" - "$1" "$2" <<'PY'
import json, sys, torch
first, second = (torch.load(f"{d}/lenet5_mnist.pt", weights_only=True)["model"] for d in sys.argv[1:])
numbers = [[{k: v for k, v in e.items() if "seconds" not in k} for e in json.load(open(f"{d}/metrics.json"))["epochs"]]
           for d in sys.argv[1:]]
print("yes" if all(torch.equal(first[k], second[k]) for k in first) and numbers[0] == numbers[1] else "NO")
PY
}

echo "| check | result |"
echo "|---|---|"
"$python" - "$device" <<'PY'
import sys, torch, torchvision
device = sys.argv[1]
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
print(f"| environment | {name}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()} |")
PY

wall=$(seconds "${train[@]}" --out-dir "$work/first")
echo "| default run: wall time of \`python mnist_recognition.py\` | ${wall} s |"
echo "| default run: training seconds (sum of epochs) | $(metric "$work/first" "f\"{m['training_seconds']:.2f} s\"") |"
echo "| default run: seconds per epoch | $(metric "$work/first" "', '.join(f\"{e['seconds']:.2f}\" for e in m['epochs'])") |"
echo "| default run: test accuracy | $(metric "$work/first" "f\"{m['eval_accuracy']:.3f} %\"") |"
echo "| default run: precision | $(metric "$work/first" "m['precision']") |"

seconds "${train[@]}" --out-dir "$work/second" > /dev/null
echo "| two identical runs give identical weights and numbers | $(same_run "$work/first" "$work/second") |"

# Ctrl-C in the middle of training, then --resume.
"${train[@]}" --out-dir "$work/resumed" > "$work/interrupted.log" 2>&1 &
job=$!
for _ in $(seq 1200); do grep -q "Epoch 1, Batch 200]" "$work/interrupted.log" 2>/dev/null && break; sleep 0.05; done
kill -INT "$job"; wait "$job" || true
seconds "${train[@]}" --out-dir "$work/resumed" --resume > /dev/null
echo "| --resume after Ctrl-C is bit-exact ($(grep -o 'Interrupted in epoch [0-9]* after batch [0-9]*' "$work/interrupted.log" || echo 'not interrupted')) | $(same_run "$work/first" "$work/resumed") |"

wall=$(seconds venv/bin/torchrun --standalone --nproc_per_node=1 mnist_recognition.py --device "$device" \
       --epochs 1 --no-download --out-dir "$work/torchrun")
echo "| torchrun, 1 process, 1 epoch: backend, accuracy, wall time | $(metric "$work/torchrun" "f\"{m['backend']}, {m['eval_accuracy']:.3f} %\""), ${wall} s |"

"$python" mnist_recognition.py evaluate --device "$device" --no-download --checkpoint "$work/first/lenet5_mnist.pt" \
    --out-dir "$work/evaluate-gpu" > "$work/evaluate-gpu.log" 2>&1
"$python" mnist_recognition.py evaluate --device cpu --no-download --checkpoint "$work/first/lenet5_mnist.pt" \
    --out-dir "$work/evaluate-cpu" > "$work/evaluate-cpu.log" 2>&1
accuracy() { grep -o 'test images: [0-9.]* %' "$1" | head -n 1; }
echo "| evaluate on $device / on the CPU | $(accuracy "$work/evaluate-gpu.log") / $(accuracy "$work/evaluate-cpu.log") |"

"$python" - "$work/digits" <<'PY'
import sys, pathlib, torchvision
folder = pathlib.Path(sys.argv[1]); folder.mkdir()
test = torchvision.datasets.MNIST("data", train=False)
for index in range(20):
    test[index][0].save(folder / f"{index}.png")
PY
"$python" mnist_recognition.py predict "$work"/digits/*.png --json --device "$device" \
    --checkpoint "$work/first/lenet5_mnist.pt" > "$work/predict-gpu.json" 2> /dev/null
"$python" mnist_recognition.py predict "$work"/digits/*.png --json --device cpu \
    --checkpoint "$work/first/lenet5_mnist.pt" > "$work/predict-cpu.json" 2> /dev/null
"$python" - "$work/predict-gpu.json" "$work/predict-cpu.json" <<'PY'
import json, sys
gpu, cpu = (json.load(open(path)) for path in sys.argv[1:])
same = [a["class"] == b["class"] for a, b in zip(gpu, cpu)]
gap = max(abs(p - q) for a, b in zip(gpu, cpu) for p, q in zip(a["probabilities"], b["probabilities"]))
print(f"| predict 20 test digits on the GPU and the CPU: same answers, largest probability gap | "
      f"{sum(same)} of {len(same)}, {gap:.1e} |")
PY

seconds "$python" mnist_recognition.py --recipe fast --device "$device" --no-download --out-dir "$work/fast" > /dev/null
echo "| fast recipe: training seconds, test accuracy | $(metric "$work/fast" "f\"{m['training_seconds']:.2f} s, {m['eval_accuracy']:.3f} %\"") |"
