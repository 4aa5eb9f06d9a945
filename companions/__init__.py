"""What sits beside mnist_recognition.py, grouped by what a user does, one file per job.

training/     the plumbing the script's story calls in one line each: flags, datasets and their
              files, devices, Adam, schedules, augmentation, resuming, files written atomically
reports/      what explains a run or an answer in figures: the 4x4 grids, report.html and
              metrics.json, the inside view of the network
doubt/        what a model knows it does not know: calibration, the verdicts, the "not a digit"
              detector learned once per dataset, and how far the answers can be trusted
using/        a trained model put to work: predict, serve, evaluate, finetune
sharing/      a trained model handed on: export (ONNX, int8, one offline HTML page)
experiments/  many runs compared: compare, search
auditing/     labels checked: audit finds those that are probably wrong, with cleanlab

Each folder imports only the folders above it in this list, so imports flow one way: the
script imports training/, reports/ and doubt/, which never import the script; using/,
sharing/, experiments/ and auditing/ hold the commands that import the script, each imported by main
only when it runs.
"""
