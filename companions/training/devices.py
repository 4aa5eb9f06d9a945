"""Where a run computes: the CPU or torch's accelerator, and under torchrun this process's place in
the process group."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from companions.training.errors import CliError

ACCELERATORS = ("cuda", "mps", "xpu")  # what --device names besides the CPU, as torch.accelerator names them


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "none"

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(device_flag, local_rank=0):
    """The device to compute on: --device, or for auto torch's accelerator where there is one. On
    CUDA, set up for plain fp32 and reproducible kernels first."""
    kind = device_flag
    if device_flag == "auto":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        kind = accelerator.type if accelerator is not None and accelerator.type in ACCELERATORS else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    gpus = getattr(torch, kind).device_count()  # torch.cuda, torch.mps or torch.xpu
    if local_rank >= gpus:
        raise CliError(
            f"This process would use GPU {local_rank}, but this machine has {gpus} GPU(s): "
            f"start at most {gpus} process(es) per machine (torchrun --nproc_per_node={gpus}), "
            f"or train on the CPU with --device cpu."
        )
    if kind == "cuda":
        make_cuda_reproducible()
    return torch.device(kind, local_rank)


def is_available(device_flag):
    """Whether --device can be used on this machine."""
    if device_flag in ("auto", "cpu"):
        return True
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator is not None and accelerator.type == device_flag


def make_cuda_reproducible():
    """Plain fp32 (no TF32) and deterministic cuDNN and cuBLAS kernels, so that two runs on one GPU
    give the same weights; warn, rather than stop, where an operation has no deterministic kernel."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def start_runtime(device_flag):
    """Pick the device, and join the process group when torchrun started this process."""
    if "LOCAL_RANK" not in os.environ:
        return Runtime(pick_device(device_flag))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_flag, local_rank)
    timeout = datetime.timedelta(minutes=5)
    if device.type == "cpu":
        dist.init_process_group("gloo", timeout=timeout)
    else:  # NCCL on CUDA, XCCL on XPU: torch's own choice for the device
        torch.accelerator.set_device_index(device.index)
        backend = dist.get_default_backend_for_device(device)
        dist.init_process_group(backend, timeout=timeout, device_id=device)
    return Runtime(device, dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend())


def global_sum(tensor, runtime):
    """The sum of `tensor` over all processes (the tensor itself in a single process)."""
    if runtime.world_size == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def memory_format_for(device):
    # oneDNN's convolutions run faster on the channels-last layout on a CPU (benchmarks/README.md).
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def to_device(model, device):
    """The model on `device`, in the memory format that is fastest there."""
    return model.to(device, memory_format=memory_format_for(device))


def ran_on(runtime):
    return {"device": runtime.device.type, "world_size": runtime.world_size}
