"""The suspects: the images whose label is probably wrong, found by cleanlab from the labels and
probabilities out of sample, strongest first; and audit.json, audit.html and suspects.png of them.

A suspect is an image that the models which never learned it read as another class than its label
(cleanlab's filter "predicted_neq_given"). They are ranked by the quality cleanlab gives the label:
the probability the models give it (self-confidence), lowest first. Each also says whether
cleanlab's confident learning counts it a label error (`confident`): the models read it as its
suggested class at least as surely as they read that class's own images on average, and it is among
the errors that the counts so made let cleanlab expect of its label (prune by noise rate). Confident
learning alone finds few on a split that models read at 99 %, where most misread images are hard,
not mislabelled; the ranked list lets a person look further down.
"""

import base64
import html
import io
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image

from companions.reports.grids import display_pixels, plot_digit_grid
from companions.reports.report import html_table
from companions.training import files

AUDIT_JSON, AUDIT_HTML, SUSPECTS_PNG = "audit.json", "audit.html", "suspects.png"
PAGE_FILE = Path(__file__).with_name("audit_page.html")
RANKED_BY = "self_confidence"  # cleanlab's label-quality score that orders the suspects
SHOWN_ON_PAGE = 400  # the strongest suspects the page shows; audit.json holds all
DIGITS = 4  # the decimals of each probability in audit.json


def as_rows_of_one(probabilities):
    """The probabilities as float64 rows that sum to 1 as exactly as cleanlab checks."""
    rows = np.asarray(probabilities, dtype=np.float64)
    return rows / rows.sum(1, keepdims=True)


def find_suspects(labels, probabilities):
    """(the indices of the suspects, strongest first; every image's label-quality score; whether
    confident learning counts each image a label error)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    ranked = find_label_issues(
        labels, probabilities, filter_by="predicted_neq_given", return_indices_ranked_by=RANKED_BY
    )
    confident = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate")
    return ranked.tolist(), get_label_quality_scores(labels, probabilities, method=RANKED_BY), confident


def suspect_entries(ranked, scores, confident, labels, probabilities, where):
    """audit.json's suspects: each with where it is (`where(i)`: {"index": i} or {"file": ...}), its
    given label, the suggested one, its score, whether confident learning counts it an error, and
    its probabilities."""
    entries = []
    for rank, image in enumerate(ranked, start=1):
        given = int(labels[image])
        entries.append(
            {
                "rank": rank,
                **where(image),
                "given": given,
                "suggested": int(probabilities[image].argmax()),  # a suspect's likeliest class is another
                "score": float(f"{scores[image]:.3g}"),
                "confident": bool(confident[image]),
                "probabilities": [round(float(value), DIGITS) for value in probabilities[image]],
            }
        )
    return entries


def confusions(entries, labels, class_count):
    """Per given class: its images, its suspects, and how many of them read as each other class."""
    counts = np.bincount(np.asarray(labels), minlength=class_count)
    table = np.zeros((class_count, class_count), dtype=int)
    for entry in entries:
        table[entry["given"], entry["suggested"]] += 1
    return [
        {
            "class": given,
            "images": int(counts[given]),
            "suspects": int(table[given].sum()),
            "suggested": table[given].tolist(),
        }
        for given in range(class_count)
    ]


# ----------------------------------------------------------------------------------------------
# The answer: audit.json, suspects.png and audit.html
# ----------------------------------------------------------------------------------------------


def write_answer(out_dir, audit, inputs, dataset):
    """suspects.png (the 16 strongest), audit.html, and last audit.json (`audit`); `inputs` are the
    suspects' network inputs, strongest first."""
    heading = f"The strongest suspects: {audit['what']}"
    plot_strongest(out_dir / SUSPECTS_PNG, audit["suspects"], inputs, dataset, heading)
    write_page(out_dir / AUDIT_HTML, audit, inputs, dataset)
    files.write_json(out_dir / AUDIT_JSON, audit)


def name_of(entry):
    return f"#{entry['index']}" if "index" in entry else Path(entry["file"]).name


def grid_titles(entries, dataset):
    """'#947: 8, reads 9' for each suspect."""
    return [
        f"{name_of(entry)}: given {dataset.classes[entry['given']]}\nreads {dataset.classes[entry['suggested']]}"
        for entry in entries
    ]


def plot_strongest(path, entries, inputs, dataset, heading):
    plot_digit_grid(inputs[:16], grid_titles(entries[:16], dataset), heading, path, dataset, title_size=9)


def png_of(image, dataset):
    """A network input as a small PNG, in a data URL."""
    pixels = (display_pixels(image, dataset) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def suspect_tiles(entries, inputs, dataset):
    tiles = []
    for entry, image in zip(entries, inputs):
        given, suggested = dataset.classes[entry["given"]], dataset.classes[entry["suggested"]]
        tiles.append(
            f'<figure class="suspect" data-rank="{entry["rank"]}" data-confident="{str(entry["confident"]).lower()}">'
            f'<img src="{png_of(image, dataset)}" '
            f'alt="{html.escape(name_of(entry))}"><figcaption><b>{html.escape(name_of(entry))}</b><br>'
            f"given {html.escape(given)}, reads {html.escape(suggested)}<br>"
            f"{percent(entry['score'])} for its label</figcaption></figure>"
        )
    return "".join(tiles)


def percent(probability):
    """A label's probability as the log and the page write it."""
    return f"{100 * probability:.2g} %" if probability >= 1e-4 else "under 0.01 %"


def confusion_table(summary, dataset):
    header = ["given", "images", "suspects", *(f"reads {name}" for name in dataset.classes)]
    rows = [
        [dataset.classes[row["class"]], row["images"], row["suspects"], *(count or "" for count in row["suggested"])]
        for row in summary
    ]
    return html_table(header, rows)


def write_page(path, audit, inputs, dataset):
    entries = audit["suspects"]
    shown = entries[:SHOWN_ON_PAGE]
    more = f" The page shows the strongest {len(shown)}; {AUDIT_JSON} lists all." if len(entries) > len(shown) else ""
    page = Template(PAGE_FILE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"Labels to check: {audit['what']}"),
        summary=html.escape(
            f"{len(entries)} suspects among {audit['images']} images, read by {audit['read_by']}.{more}"
        ),
        table=confusion_table(audit["classes"], dataset),
        tiles=suspect_tiles(shown, inputs[: len(shown)], dataset),
    )
    files.write_atomically(path, lambda file: file.write(page.encode()))
