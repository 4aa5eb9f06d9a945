"""What a model knows it does not know, learned once training ends; none imports the script.

verdicts.py       the temperature, the "not sure" threshold, and the three verdicts
detector.py       the "not a digit" network, its recipe, its training and its threshold
kept_detector.py  the detector learned once per dataset and kept beside the dataset's files
real_digits.py    the dataset's digits as pens, paper and scanners change them: what it must not doubt
non_digits.py     the families of images that are not digits, made on the spot
trust.py          how far the answers on a split can be trusted: ECE, calibration.png, the verdicts' counts
"""
