"""A whole number in one image: every digit found, in reading order, each prepared as predict prepares
one digit (companions/using/prepare.py).

1. The ink: the image's ink above its paper as prepare.py finds it, where it is above a fifth of
   the brightest (prepare.py's crop).
2. Pieces: each connected stretch of ink (scipy.ndimage.label, corners touching too). Specks far
   smaller than the largest piece are grain, and left out.
3. Joined: pieces close one above the other that share most of the narrower one's columns are one
   digit (a broken 4, a 7's bar), and so is a short stroke close beside a digit and above its
   middle (a 5's detached flag).
4. Split: a piece that the model does not read well as one digit may be digits that touch. It is
   cut along candidate cuts (down the columns that cross the least ink, straight or bent around
   it), and of every way to cut it, not cutting it at all included, the one whose parts the model
   reads best is kept: their scores (the caller's `judge`) added up, less PART_COST per part.
5. Each prepared alone: its own ink and none of its neighbours', cropped, strokes matched, its
   longer side 20 px, its centre of mass at the centre of a 28x28 field.

An image whose ink is one piece is cut only where the model calls it not a digit, and is otherwise
prepared whole, as predict always has: an image of one digit keeps its answer, bit for bit. Its
parts are marked: the model reads a drawing that is no digit (a zigzag) as digits that touch (1s)
as readily as it reads digits that touch, and the callers call such parts "not sure" at best. A
piece far lower than the tallest (a dot, a comma, a dash) is marked small: the callers call it not
a digit and leave it out of the number.

This file knows images, numpy and scipy only: the model comes in as the judge.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from companions.using.prepare import as_in_dataset, cropped, ink_of, placed_like_mnist, prepared_pixels

MAX_PIECES = 30  # pieces read from one image; the rest are counted and said to be unread
INK_LEVEL = 0.2  # of the brightest ink: what counts as ink, as prepare.py's crop counts it
SPECK = 0.02  # of the largest piece's area: smaller ink is grain
JOIN_OVERLAP = 0.5  # of the narrower piece's columns, shared by two pieces of one digit
JOIN_GAP = 0.5  # of the taller piece's height: the most rows between two pieces of one digit
FLAG_GAP = 0.1  # of the tallest piece's height: the widest gap between a digit and its detached flag
SMALL = 0.45  # of the tallest piece's height: a piece lower than this is punctuation
# When a piece is tried as digits that touch (its width over its height), and how it is cut:
SPLITTABLE = 0.3  # above this, where the model reads it badly (its score below READ_WELL)
READ_WELL = -3.0  # the judge's score (a log-probability) of a piece read well
WIDE = 1.15  # above this, always
CUTS = 16  # straight candidate cuts (and as many bent ones)
CUT_SPACING = 0.125  # of its height: the least distance between two cuts, and from its sides
BEND = 0.2  # of its height: how far a bent cut may stray from its column
INK_COST, SLANT_COST = 10, 3  # a bent cut's cost: per pixel of ink it crosses, per slanted step
MAX_PART = 1.2  # of its height: the widest part tried
PART_COST = 1.25  # taken from the score of every part: fewer parts, unless more are read better
FRAGMENT = 0.15  # of a part's largest piece: its smaller pieces are the neighbour's, left by the cut
HALO = 2  # pixels around a piece's ink that go with it (the faint edge of its strokes)


@dataclass
class Piece:
    """One piece of a number: where it is, and the network's 28x28 pixels of it."""

    box: tuple  # x0, y0, x1, y1 in the image's pixels; x1 and y1 one past its last column and row
    pixels: np.ndarray  # 28 x 28, 0..1
    small: bool = False  # far lower than the tallest: a dot, a comma or a dash
    cut_from_one: bool = False  # cut from the image's only piece of ink, which the model called no digit


@dataclass
class Found:
    """What an image holds: its pieces in reading order, and how many more were left unread."""

    pieces: list
    unread: int = 0


def digits_in(gray, dataset, judge):
    """The pieces of the number in a grayscale image, left to right. `judge` takes a list of 28x28
    pixel arrays and gives (each one's score, the higher the more it reads as a digit; whether the
    model calls each a digit). Raises prepare's NoInk."""
    if dataset.image_kind != "digit" or as_in_dataset(gray, dataset) is not None:
        return whole_image(gray, dataset)
    ink = ink_of(gray)
    labels, groups = joined_pieces(ink)
    if len(groups) == 1:  # its one piece is the whole image, prepared as predict has always prepared one
        found = whole_image(gray, dataset)
        if ratio_of(groups[0]) <= SPLITTABLE:
            return found
        (score,), (is_digit,) = judge([found.pieces[0].pixels])
        parts = split(ink, labels, groups[0], found.pieces[0], (score, is_digit), judge, dataset, alone=True)
        return found if len(parts) == 1 else Found([Piece(part.box, part.pixels, cut_from_one=True) for part in parts])
    tallest, unread = max(height_of(group) for group in groups), max(0, len(groups) - MAX_PIECES)
    groups = groups[:MAX_PIECES]
    wholes = [piece_of(ink, labels, group, dataset, small=height_of(group) < SMALL * tallest) for group in groups]
    tried = [i for i, group in enumerate(groups) if not wholes[i].small and ratio_of(group) > SPLITTABLE]
    judged = dict(zip(tried, zip(*judge([wholes[i].pixels for i in tried])))) if tried else {}
    pieces = []
    for i, (group, whole) in enumerate(zip(groups, wholes)):
        pieces.extend(split(ink, labels, group, whole, judged[i], judge, dataset) if i in judged else [whole])
    return Found(pieces[:MAX_PIECES], unread + max(0, len(pieces) - MAX_PIECES))


def whole_image(gray, dataset):
    """The image as one piece, prepared as predict has always prepared an image."""
    return Found([Piece((0, 0, gray.width, gray.height), prepared_pixels(gray, dataset))])


# ----------------------------------------------------------------------------------------------
# Pieces of ink, joined into digits
# ----------------------------------------------------------------------------------------------


@dataclass
class Group:
    """Pieces of ink that make one digit (or digits that touch): their labels and their box."""

    labels: list
    box: tuple  # x0, y0, x1, y1


def height_of(group):
    return group.box[3] - group.box[1]


def width_of(group):
    return group.box[2] - group.box[0]


def ratio_of(group):
    return width_of(group) / height_of(group)


def joined_pieces(ink):
    """(the label of each pixel's piece, the groups of pieces in reading order)."""
    labels, count = ndimage.label(ink > INK_LEVEL * ink.max(), structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    groups = [
        Group([label], (found[1].start, found[0].start, found[1].stop, found[0].stop))
        for label, found in enumerate(ndimage.find_objects(labels), start=1)
        if areas[label - 1] >= SPECK * areas.max()
    ]
    groups.sort(key=lambda group: (group.box[0], group.box[1]))
    joined, reaching = [], []  # reaching: the joined groups that a group further right may still overlap
    for group in groups:
        reaching = [other for other in reaching if other.box[2] > group.box[0]]
        partner = next((other for other in reaching if share_columns(other, group)), None)
        if partner is None:
            joined.append(group)
            reaching.append(group)
        else:
            join(partner, group)
    tallest = max(height_of(group) for group in joined)
    strokes = [group for group in joined if height_of(group) < SMALL * tallest]
    for stroke in strokes if len(joined) <= 2 * MAX_PIECES else []:  # more is no number: no time spent on flags
        digit = next((other for other in joined if is_flag(stroke, other, tallest)), None)
        if digit is not None:
            join(digit, stroke)
            joined.remove(stroke)
    joined.sort(key=lambda group: ((group.box[0] + group.box[2]) / 2, group.box[1]))
    return labels, joined


def share_columns(first, second):
    """Whether two groups share most of the narrower one's columns and lie close one above the other
    (no further apart than half the taller one's height): parts of one digit."""
    shared = min(first.box[2], second.box[2]) - max(first.box[0], second.box[0])
    apart = max(first.box[1], second.box[1]) - min(first.box[3], second.box[3])
    close = apart <= JOIN_GAP * max(height_of(first), height_of(second))
    return close and shared >= JOIN_OVERLAP * min(width_of(first), width_of(second))


def is_flag(stroke, digit, tallest):
    """Whether a short stroke is a detached part of a digit beside it (a 5's flag): no further from
    it than FLAG_GAP of the tallest piece's height, and above its middle."""
    gap = max(stroke.box[0] - digit.box[2], digit.box[0] - stroke.box[2])
    above_middle = stroke.box[3] <= (digit.box[1] + digit.box[3]) / 2
    return height_of(digit) >= SMALL * tallest and gap <= FLAG_GAP * tallest and above_middle


def join(group, other):
    group.labels += other.labels
    group.box = (
        min(group.box[0], other.box[0]),
        min(group.box[1], other.box[1]),
        max(group.box[2], other.box[2]),
        max(group.box[3], other.box[3]),
    )


# ----------------------------------------------------------------------------------------------
# Digits that touch, cut where the model reads every part best
# ----------------------------------------------------------------------------------------------


def split(ink, labels, group, whole, judged, judge, dataset, alone=False):
    """The group as its one piece `whole` (judged: its score, and whether the model calls it a digit),
    or the parts of the way to cut it whose parts the model reads best. The only group of an image
    (`alone`) is cut only where the model calls it not a digit, and only into parts that it calls
    digits: an image of one digit, or a drawing of none, stays one piece."""
    whole_score, whole_is_digit = judged
    if (alone and whole_is_digit) or (ratio_of(group) <= WIDE and whole_score >= READ_WELL):
        return [whole]
    x0, y0, x1, y1 = group.box
    cuts = [np.full(y1 - y0, x0), *candidate_cuts(labels, group), np.full(y1 - y0, x1)]
    last = len(cuts) - 1
    spans = [(a, b) for a in range(last) for b in range(a + 1, last + 1) if (a, b) != (0, last)]
    spans = [(a, b) for a, b in spans if cuts[b][0] - cuts[a][0] <= MAX_PART * height_of(group)]
    parts = {span: piece_of(ink, labels, group, dataset, cuts[span[0]], cuts[span[1]]) for span in spans}
    parts = {span: part for span, part in parts.items() if part is not None}
    if not parts:
        return [whole]
    scores, are_digits = judge([part.pixels for part in parts.values()])
    score_of = {span: score for span, score, is_digit in zip(parts, scores, are_digits) if is_digit or not alone}
    score_of[(0, last)] = whole_score
    best = best_parts(last, score_of)
    return [whole] if best == [(0, last)] else [parts[span] for span in best]


def best_parts(last, score_of):
    """The spans (a, b) from cut 0 to cut `last` whose scores, less PART_COST each, add up to the
    most; of equal ones, the one with fewer parts (dynamic programming over the cuts, left to right)."""
    best = {0: (0.0, [])}  # per cut: the best total score of a way there, and its spans
    for b in range(1, last + 1):
        ways = [
            (best[a][0] + score_of[(a, b)] - PART_COST, best[a][1] + [(a, b)])
            for a in range(b)
            if a in best and (a, b) in score_of
        ]
        if ways:
            best[b] = max(ways, key=lambda way: (way[0], -len(way[1])))
    return best[last][1]


def candidate_cuts(labels, group):
    """Cuts from the group's top to its bottom, left to right, each as its column in every row:
    straight down the CUTS columns that cross the least of its ink (none nearer than CUT_SPACING of
    its height to another or to its sides), and each of those bent where that crosses less ink."""
    x0, y0, x1, y1 = group.box
    crossing = np.isin(labels[y0:y1, x0:x1], group.labels).sum(0)
    spacing = max(1, round(CUT_SPACING * height_of(group)))
    columns = []
    for column in np.argsort(crossing, kind="stable"):
        if spacing <= column <= width_of(group) - spacing and all(abs(column - other) >= spacing for other in columns):
            columns.append(int(column))
        if len(columns) == CUTS:
            break
    straight = [np.full(y1 - y0, x0 + column) for column in sorted(columns)]
    bent = [bent_cut(labels, group, column) for column in sorted(columns)]
    unique = {tuple(cut): cut for cut in straight + bent}
    return sorted(unique.values(), key=lambda cut: cut.mean())


def bent_cut(labels, group, column):
    """The path from the group's top to its bottom, within BEND of its height from `column` (of its
    box), moving at most one column per row, that costs the least: INK_COST per pixel of ink it
    crosses, SLANT_COST per slanted step and per column it ends away from `column` (dynamic
    programming, row by row; of equal paths, the leftmost)."""
    x0, y0, x1, y1 = group.box
    reach = max(1, round(BEND * height_of(group)))
    low, high = max(0, column - reach), min(width_of(group), column + reach + 1)
    crossing = np.where(np.isin(labels[y0:y1, x0 + low : x0 + high], group.labels), INK_COST, 0)
    total, came_from = crossing[0].copy(), np.zeros(crossing.shape, dtype=np.int64)
    blocked = INK_COST * len(crossing) + SLANT_COST * (len(crossing) + high - low) + 1  # more than any path costs
    for row in range(1, len(crossing)):
        options = np.stack([np.r_[blocked, total[:-1]] + SLANT_COST, total, np.r_[total[1:], blocked] + SLANT_COST])
        came_from[row] = options.argmin(0) - 1  # -1: from the left, 0: from above, 1: from the right
        total = options.min(0) + crossing[row]
    path = np.empty(len(crossing), dtype=np.int64)
    path[-1] = np.argmin(total + SLANT_COST * np.abs(np.arange(low, high) - column))
    for row in range(len(crossing) - 1, 0, -1):
        path[row - 1] = path[row] + came_from[row, path[row]]
    return x0 + low + path


# ----------------------------------------------------------------------------------------------
# One piece, prepared alone
# ----------------------------------------------------------------------------------------------


def piece_of(ink, labels, group, dataset, left_cut=None, right_cut=None, small=False):
    """The group's ink alone (with its faint edge, without its neighbours'), between two cuts (each
    a column per row of the group) where given, prepared as one digit; None where no ink is left."""
    x0, y0, x1, y1 = group.box
    is_part = left_cut is not None
    if not is_part:
        left_cut, right_cut = np.full(y1 - y0, x0), np.full(y1 - y0, x1)
    # A window around the part, as far as its faint edge can reach.
    top, left = max(y0 - HALO, 0), max(int(left_cut.min()) - HALO, 0)
    window = np.s_[top : y1 + HALO, left : int(right_cut.max()) + HALO]
    mine = np.isin(labels[window], group.labels)
    near = ndimage.binary_dilation(mine, iterations=HALO) & ~((labels[window] > 0) & ~mine)
    rows = np.clip(np.arange(top, top + near.shape[0]) - y0, 0, y1 - y0 - 1)  # rows above or below: the nearest's cut
    columns = np.arange(left, left + near.shape[1])
    near &= (columns >= left_cut[rows][:, None]) & (columns < right_cut[rows][:, None])
    alone = np.where(near, ink[window], 0)
    if alone.max() <= 0:
        return None
    kept = alone > INK_LEVEL * alone.max()
    if is_part:  # without the bits of its neighbours that the cuts left it
        kept = without_fragments(kept)
        alone = np.where(ndimage.binary_dilation(kept, iterations=HALO), alone, 0)
    rows, cols = np.flatnonzero(kept.any(1)), np.flatnonzero(kept.any(0))
    box = (left + int(cols[0]), top + int(rows[0]), left + int(cols[-1]) + 1, top + int(rows[-1]) + 1)
    return Piece(box, placed_like_mnist(cropped(alone), dataset), small)


def without_fragments(kept):
    """The ink's pieces, less those far smaller than its largest."""
    labels, count = ndimage.label(kept, structure=np.ones((3, 3)))
    if count < 2:
        return kept
    areas = np.bincount(labels.ravel())[1:]
    return np.isin(labels, 1 + np.flatnonzero(areas >= FRAGMENT * areas.max()))
