"""What sits beside mnist_recognition.py, one file per job.

The plumbing the script imports, each called in one line from its story; none of these imports
the script:

command_line.py   the flags, made from the script's SETTINGS and RECIPES, and their help
datasets.py       the datasets --dataset names: folders, classes, normalisation, augmentation limits
dataset_files.py  a dataset's files found, checked, extracted or fetched, and read
devices.py        the CPU or torch's accelerator; this process's place under torchrun
adam.py           torch's fused Adam, bit for bit, without torch.compile's hooks
schedules.py      --schedule: the learning rate over a run
augment.py        --augment's kernels, drawn for a whole global batch
resume.py         Progress, Ctrl-C, the command that continues a run, and the checks --resume makes
files.py          every file written atomically, never over another command's; checkpoints read safely
grids.py          the 4x4 grids of images, on matplotlib Figures
errors.py         CliError and LossDiverged
report.py         the figures that explain a run, report.html (report_page.html) and metrics.json;
                  imported when a run writes its outputs

What uses a trained model or decorates a run, each imported only by the command that needs it
(these may import the script):

trained.py        a checkpoint made into LeNet-5 on a device, with its dataset
prepare.py        a photo, scan or drawing turned into the network's 28x28 input
predict.py        predict: read your own images
serve.py          serve: a page to draw on (page.html), and POST /predict
evaluate.py       evaluate: re-check a trained model on its test set, or on a folder of your images
own_images.py     your labelled images, one sub-folder per class: saved by serve --collect, read by the rest
finetune.py       finetune: a trained model taught a folder of your images
export.py         export: one ONNX file, checked with ONNX Runtime
"""
