"""--schedule: how the learning rate moves over all the steps of a run, as torch's schedulers do it."""

import math

import torch


def new_schedule(optimizer, args, steps_per_epoch):
    """The learning-rate schedule, stepped after every batch over all epochs' steps."""
    total_steps = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        # cycle_momentum off: Adam's betas stay what --adam-betas says.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=args.warmup, cycle_momentum=False
        )
    if args.schedule == "cosine":
        warmup_steps = max(1, round(args.warmup * total_steps))

        def cosine_with_warmup(step):
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
    if args.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[total_steps // 2, (3 * total_steps) // 4], gamma=0.1
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
