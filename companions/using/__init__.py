"""A trained model put to work: each command imported by main only when it runs.

trained.py        a checkpoint made into LeNet-5 on a device, with its dataset and its doubt
prepare.py        a photo, scan or drawing turned into the network's 28x28 input
predict.py        predict: read your own images
serve.py          serve: a page to draw on (page.html), and POST /predict
evaluate.py       evaluate: re-check a trained model on its test set, or on a folder of your images
own_images.py     your labelled images, one sub-folder per class: saved by serve --collect, read by the rest
finetune.py       finetune: a trained model taught a folder of your images
"""
