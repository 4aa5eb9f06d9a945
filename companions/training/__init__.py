"""The training script's plumbing, each called in one line from its story; none imports the script.

command_line.py   the flags, made from the script's SETTINGS and RECIPES, and their help
datasets.py       the datasets --dataset names: folders, classes, normalisation, augmentation limits
dataset_files.py  a dataset's files found, checked, extracted or fetched, and read
devices.py        the CPU or torch's accelerator; this process's place under torchrun
adam.py           torch's fused Adam, bit for bit, without torch.compile's hooks
schedules.py      --schedule: the learning rate over a run
augment.py        --augment's kernels, drawn for a whole global batch
resume.py         Progress, Ctrl-C, the command that continues a run, and the checks --resume makes
files.py          every file written atomically, never over another command's; checkpoints read safely
layers.py         LeNet-5's layers by name, and each one's shape, parameters and cost
errors.py         CliError and LossDiverged
"""
