"""What sits beside mnist_recognition.py, one file per job. The script imports the first three at its top;
each of the others is imported only by the command that needs it:

command_line.py   the flags, made from the script's SETTINGS table, and their help
dataset_files.py  a dataset's files found, checked, extracted or fetched
files.py          every file written atomically; checkpoints read without running what they carry
prepare.py        a photo, scan or drawing turned into the network's 28x28 input
predict.py        predict: read your own images
serve.py          serve: a page to draw on (page.html), and POST /predict
evaluate.py       evaluate: re-check a trained model on its test set, or on a folder of your images
own_images.py     your labelled images, one sub-folder per class: saved by serve --collect, read by the rest
finetune.py       finetune: a trained model taught a folder of your images
export.py         export: one ONNX file, checked with ONNX Runtime
report.py         the figures that explain a run, report.html (report_page.html) and metrics.json
"""
