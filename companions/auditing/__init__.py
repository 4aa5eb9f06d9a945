"""Labels checked: which of a dataset's, or of your own folder's, are probably wrong.

audit.py          audit: probabilities from models that never learned the images (K folds trained
                  in compare's workers, or the --checkpoint models), then cleanlab
suspects.py       the suspects, ranked, and audit.json, suspects.png and audit.html (audit_page.html)
"""
