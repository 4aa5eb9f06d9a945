"""Adam as torch.optim.Adam(fused=True) computes it, bit for bit, without the hooks for torch.compile
that torch.optim.Optimizer's constructor and step import (torch._dynamo: seconds of start-up, and
nothing they do in eager mode). Its state_dict has torch.optim.Adam's layout, so checkpoints are the same."""

import copy

import torch
from torch.optim.adam import adam


class Adam(torch.optim.Optimizer):
    """Each step is torch's own functional adam(), the fused kernel that torch.optim.Adam calls, with
    the state kept in tensors as it keeps them. It is an Optimizer to the learning-rate schedulers,
    which read and set its param_groups."""

    def __init__(self, params, lr, betas):  # without Optimizer.__init__, which imports torch._dynamo
        self.defaults = dict(ADAM_DEFAULTS, lr=lr, betas=betas)
        self.param_groups = [{"params": list(params), **self.defaults}]
        self.state = {}  # per parameter, as torch.optim.Adam keeps it: step, exp_avg, exp_avg_sq

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p not in self.state:
                    self.state[p] = new_adam_state(p)
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            adam(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                [state["step"] for state in states],
                **{key: group[key] for key in ADAM_DEFAULTS if key not in ("lr", "betas")},
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                has_complex=False,
            )

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self):
        """As torch.optim.Adam's: the state by the parameter's index, then the group with indices."""
        params = self.param_groups[0]["params"]
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        state = {index: self.state[p] for index, p in enumerate(params) if p in self.state}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict):
        """As torch.optim.Adam's: each tensor on its parameter's device, the step in float32."""
        params = self.param_groups[0]["params"]
        self.state = {
            params[index]: {
                key: value.to(
                    dtype=torch.float32 if key == "step" else params[index].dtype, device=params[index].device
                )
                for key, value in saved.items()
            }
            for index, saved in state_dict["state"].items()
        }
        [saved_group] = copy.deepcopy(state_dict["param_groups"])
        self.param_groups = [{**saved_group, "params": params}]


# torch.optim.Adam's settings, as its param_groups hold them: fused, no weight decay.
ADAM_DEFAULTS = {
    "lr": None,
    "betas": None,
    "eps": 1e-8,
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": False,
}


def new_adam_state(parameter):
    """A parameter's Adam state before its first step, as torch.optim.Adam makes it when fused."""
    return {
        "step": torch.zeros((), dtype=torch.float32, device=parameter.device),
        "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
    }
