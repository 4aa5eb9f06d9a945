"""Many training runs, and what they show beyond seed noise.

compare.py        compare: the baseline and its variants over paired seeds, in worker processes
comparison.py     compare's answer: the statistics, compare.json, .md and .html (compare_page.html)
search_space.py   search's --space: each spec a range or choices of a setting
search.py         search: Optuna's study, each trial a training run, the best confirmed by compare
search_answer.py  search's answer: search.json, .md and .html (search_page.html) with its figures
"""
