// The page's answers without a server: what serve does in Python (companions/using/prepare.py, the
// network's forward pass, companions/reports/inside.py's backward passes, the doubt's verdicts), done here in
// plain JavaScript over typed arrays, on the weights that export --html put in MODEL.
"use strict";

// ----------------------------------------------------------------------------------------------
// The weights: base64 float32 arrays, decoded once
// ----------------------------------------------------------------------------------------------

function floats(base64) {
  const bytes = Uint8Array.from(atob(base64), character => character.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}
for (const network of [MODEL.classifier, MODEL.detector]) {
  for (const module of network || []) {
    for (const key of ["weight", "bias", "scale", "shift"]) if (module[key]) module[key] = floats(module[key]);
  }
}

// ----------------------------------------------------------------------------------------------
// The image made into the network's 28x28 pixels, step for step as companions/using/prepare.py does
// (Pillow's conversions and its Lanczos resampling included), so that a drawing reaches the network
// as serve gives it. Pixels are float32, as numpy's are there.
// ----------------------------------------------------------------------------------------------

const MIN_INK_CONTRAST = 40, PAPER_SPREAD = 30, GRAIN_FLOOR = 4, MAX_STROKE_STEPS = 24;
const MAX_IMAGE_PIXELS = 89478485;  // Pillow's limit
const f32 = Math.fround;

class Gray {  // a grayscale image: width, height, and its pixels row by row
  constructor(width, height, pixels) {
    this.width = width; this.height = height;
    this.pixels = pixels || new Float32Array(width * height);
  }
  at(row, col) { return this.pixels[row * this.width + col]; }
  map(f) { return new Gray(this.width, this.height, this.pixels.map(f)); }
  max() { let best = -Infinity; for (const value of this.pixels) best = Math.max(best, value); return best; }
}

function roundHalfEven(value) {  // Python's round()
  const floor = Math.floor(value), rest = value - floor;
  if (rest !== 0.5) return Math.round(value);
  return floor % 2 === 0 ? floor : floor + 1;
}
function median(values) {  // numpy's: the mean of the middle two of an even count
  const sorted = Float64Array.from(values).sort(), middle = sorted.length >> 1;
  return sorted.length % 2 ? sorted[middle] : f32((sorted[middle - 1] + sorted[middle]) / 2);
}

function grayOf(rgba, width, height) {  // Pillow's convert("L") of pixels composited on white
  const gray = new Gray(width, height);
  for (let i = 0; i < width * height; i++) {
    const alpha = rgba[4 * i + 3] / 255;
    const [r, g, b] = [0, 1, 2].map(c => Math.round(rgba[4 * i + c] * alpha + 255 * (1 - alpha)));
    gray.pixels[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
  }
  return gray;
}

function borderOf(image) {  // the edges in one row: top, bottom, left, right
  const {width, height} = image, values = [];
  for (let col = 0; col < width; col++) values.push(image.at(0, col));
  for (let col = 0; col < width; col++) values.push(image.at(height - 1, col));
  for (let row = 0; row < height; row++) values.push(image.at(row, 0));
  for (let row = 0; row < height; row++) values.push(image.at(row, width - 1));
  return values;
}

function backgroundLight(image) {  // a plane fitted to the border's paper, or its median
  const {width, height} = image, border = borderOf(image), level = median(border);
  const rows = [], cols = [];
  for (let col = 0; col < width; col++) { rows.push(0); cols.push(col); }
  for (let col = 0; col < width; col++) { rows.push(height - 1); cols.push(col); }
  for (let row = 0; row < height; row++) { rows.push(row); cols.push(0); }
  for (let row = 0; row < height; row++) { rows.push(row); cols.push(width - 1); }
  const near = border.map(value => Math.abs(value - level) <= PAPER_SPREAD);
  const paper = border.filter((_, i) => near[i]);
  if (!paper.length || Math.max(...paper) === Math.min(...paper)) return () => level;
  // Least squares of value ~ constant + per_row * row + per_col * col, by the normal equations.
  const sums = Array.from({length: 3}, () => [0, 0, 0, 0]);
  border.forEach((value, i) => {
    if (!near[i]) return;
    const x = [1, rows[i], cols[i]];
    for (let a = 0; a < 3; a++) { for (let b = 0; b < 3; b++) sums[a][b] += x[a] * x[b]; sums[a][3] += x[a] * value; }
  });
  for (let a = 0; a < 3; a++) {  // Gauss-Jordan with partial pivoting
    const pivot = [a, a + 1, a + 2].filter(r => r < 3).reduce((p, r) => Math.abs(sums[r][a]) > Math.abs(sums[p][a]) ? r : p);
    [sums[a], sums[pivot]] = [sums[pivot], sums[a]];
    for (let r = 0; r < 3; r++) {
      if (r === a || sums[a][a] === 0) continue;
      const factor = sums[r][a] / sums[a][a];
      for (let c = a; c < 4; c++) sums[r][c] -= factor * sums[a][c];
    }
  }
  const [constant, perRow, perCol] = sums.map((row, a) => row[a] ? row[3] / row[a] : 0);
  return (row, col) => f32(constant + perRow * row + perCol * col);
}

function grain(abovePaper) {  // the paper's robust standard deviation along the border
  const border = borderOf(abovePaper), middle = median(border);
  const deviations = border.map(value => f32(Math.abs(value - middle))).filter(value => value <= PAPER_SPREAD);
  return deviations.length ? f32(1.4826 * median(deviations)) : 0;
}

class NoInk extends Error {}

function foreground(gray) {  // light on dark, the paper's light and grain taken away, cropped
  return cropped(inkOf(gray));
}

function inkOf(gray) {  // the whole image's ink above the paper, light on dark, 0..255 levels
  let pixels = gray.map(value => value);
  if (median(borderOf(pixels)) > 127) pixels = pixels.map(value => 255 - value);
  const light = backgroundLight(pixels);
  const above = new Gray(pixels.width, pixels.height);
  for (let row = 0; row < pixels.height; row++) {
    for (let col = 0; col < pixels.width; col++) above.pixels[row * pixels.width + col] = pixels.at(row, col) - light(row, col);
  }
  const floor = f32(GRAIN_FLOOR * grain(above));
  const ink = above.map(value => Math.max(f32(value - floor), 0));
  if (ink.max() < MIN_INK_CONTRAST) throw new NoInk("no ink or object found; the image looks blank");
  return ink;
}

function cropped(ink) {  // scaled to 0..1, cropped to where it is above 0.2
  const top = ink.max(), scaled = ink.map(value => value / top), threshold = f32(0.2);
  let first = [Infinity, Infinity], last = [-1, -1];
  for (let row = 0; row < scaled.height; row++) {
    for (let col = 0; col < scaled.width; col++) {
      if (scaled.at(row, col) > threshold) {
        first = [Math.min(first[0], row), Math.min(first[1], col)]; last = [Math.max(last[0], row), Math.max(last[1], col)];
      }
    }
  }
  return crop(scaled, first[0], first[1], last[0] + 1, last[1] + 1);
}

function crop(image, top, left, bottom, right) {
  const out = new Gray(right - left, bottom - top);
  for (let row = top; row < bottom; row++) {
    out.pixels.set(image.pixels.subarray(row * image.width + left, row * image.width + right), (row - top) * out.width);
  }
  return out;
}

// Pillow's resize(size, LANCZOS) of an 8-bit image: two passes of fixed-point filters.
const PRECISION_BITS = 32 - 8 - 2;
function sinc(x) { if (x === 0) return 1; x *= Math.PI; return Math.sin(x) / x; }
function lanczos(x) { return -3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0; }
function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterScale = Math.max(scale, 1), support = 3 * filterScale;
  const size = Math.ceil(support) * 2 + 1, bounds = [], weights = [];
  for (let out = 0; out < outSize; out++) {
    const centre = (out + 0.5) * scale;
    const low = Math.max(Math.trunc(centre - support + 0.5), 0);
    const count = Math.min(Math.trunc(centre + support + 0.5), inSize) - low;
    const k = [];
    let total = 0;
    for (let x = 0; x < count; x++) { const w = lanczos((x + low - centre + 0.5) * (1 / filterScale)); k.push(w); total += w; }
    weights.push(k.map(w => {
      const normal = total !== 0 ? w / total : w;
      return Math.trunc(normal < 0 ? -0.5 + normal * (1 << PRECISION_BITS) : 0.5 + normal * (1 << PRECISION_BITS));
    }));
    bounds.push([low, count]);
  }
  return {bounds, weights};
}
function clip8(sum) {
  if (sum >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (sum <= 0) return 0;
  return Math.floor(sum / 2 ** PRECISION_BITS);
}
function resize(image, width, height) {  // 0..255 integer pixels in and out
  if (width === image.width && height === image.height) return image.map(value => value);
  const horizontal = coefficients(image.width, width), vertical = coefficients(image.height, height);
  let source = image;
  if (width !== image.width) {
    const first = vertical.bounds[0][0], last = vertical.bounds[height - 1][0] + vertical.bounds[height - 1][1];
    const passed = new Gray(width, height !== image.height ? last - first : image.height);
    const offset = height !== image.height ? first : 0;
    for (let row = 0; row < passed.height; row++) {
      for (let col = 0; col < width; col++) {
        const [low, count] = horizontal.bounds[col], k = horizontal.weights[col];
        let sum = 1 << (PRECISION_BITS - 1);
        for (let x = 0; x < count; x++) sum += image.at(row + offset, x + low) * k[x];
        passed.pixels[row * width + col] = clip8(sum);
      }
    }
    if (height !== image.height) vertical.bounds.forEach(bound => { bound[0] -= first; });
    source = passed;
  }
  if (height === image.height) return source;
  const out = new Gray(source.width, height);
  for (let row = 0; row < height; row++) {
    const [low, count] = vertical.bounds[row], k = vertical.weights[row];
    for (let col = 0; col < source.width; col++) {
      let sum = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < count; y++) sum += source.at(y + low, col) * k[y];
      out.pixels[row * source.width + col] = clip8(sum);
    }
  }
  return out;
}

function resized(pixels, longerSide) {  // 0..1 pixels as an 8-bit image whose longer side is longerSide
  const scale = longerSide / Math.max(pixels.width, pixels.height);
  const width = Math.max(1, roundHalfEven(pixels.width * scale)), height = Math.max(1, roundHalfEven(pixels.height * scale));
  return resize(pixels.map(value => Math.trunc(f32(value * 255))), width, height);
}

function strokeWidth(image) {  // twice the ink's area over its outline's length
  const top = image.max(), threshold = f32(0.5 * top), width = image.width + 2, height = image.height + 2;
  const ink = new Uint8Array(width * height);
  for (let row = 0; row < image.height; row++) {
    for (let col = 0; col < image.width; col++) ink[(row + 1) * width + col + 1] = image.at(row, col) > threshold;
  }
  let outline = 0, area = 0;
  for (let row = 0; row < height; row++) {
    for (let col = 0; col < width; col++) {
      area += ink[row * width + col];
      if (row + 1 < height && ink[row * width + col] !== ink[(row + 1) * width + col]) outline++;
      if (col + 1 < width && ink[row * width + col] !== ink[row * width + col + 1]) outline++;
    }
  }
  return 2 * area / Math.max(outline, 1);
}

function rank3(image, pick) {  // Pillow's MinFilter(3) or MaxFilter(3): edges repeated
  const out = new Gray(image.width, image.height);
  for (let row = 0; row < image.height; row++) {
    for (let col = 0; col < image.width; col++) {
      let best = image.at(row, col);
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const y = Math.min(Math.max(row + dy, 0), image.height - 1), x = Math.min(Math.max(col + dx, 0), image.width - 1);
          best = pick(best, image.at(y, x));
        }
      }
      out.pixels[row * image.width + col] = best;
    }
  }
  return out;
}
function countAbove(image, level) { let count = 0; for (const value of image.pixels) count += value > level; return count; }

function withStrokesLike(ink, [low, high]) {  // strokes eroded or dilated toward the dataset's widths
  const width = strokeWidth(resized(ink, 20));
  if (low <= width && width <= high) return ink;
  const target = width > high ? high : low, pick = width > high ? Math.min : Math.max;
  let large = resized(ink, 80), best = null, bestDistance = Math.abs(width - target);
  const area = countAbove(large, 127);
  for (let step = 0; step < MAX_STROKE_STEPS; step++) {
    large = rank3(large, pick);
    if (countAbove(large, 127) < area / 2) break;
    const small = resize(large, Math.max(1, Math.floor(large.width / 4)), Math.max(1, Math.floor(large.height / 4)));
    const distance = Math.abs(strokeWidth(small) - target);
    if (distance >= bestDistance) break;
    best = large; bestDistance = distance;
  }
  return best === null ? ink : cropped(best);
}

function centreOfMass(pixels) {
  let total = 0, rows = 0, cols = 0;
  for (let row = 0; row < pixels.height; row++) {
    for (let col = 0; col < pixels.width; col++) {
      const value = pixels.at(row, col);
      total += value; rows += row * value; cols += col * value;
    }
  }
  return [rows / f32(total), cols / f32(total)];
}

function pasted(image, left, top) {  // into a black 28x28 field, as 0..1 pixels
  const field = new Float32Array(28 * 28);
  for (let row = 0; row < image.height; row++) {
    for (let col = 0; col < image.width; col++) {
      const y = row + top, x = col + left;
      if (y >= 0 && y < 28 && x >= 0 && x < 28) field[y * 28 + x] = image.at(row, col);
    }
  }
  return field.map(value => value / 255);
}

function asInDataset(gray) {  // a 28x28 image already as the dataset's own: unchanged
  if (gray.width !== 28 || gray.height !== 28) return null;
  const pixels = gray.map(value => value / 255);
  if (!pixels.pixels.some(value => value > 0)) return null;
  if (median(borderOf(pixels)) > (MODEL.kind === "digit" ? f32(0.05) : f32(0.5))) return null;
  let first = [28, 28], last = [-1, -1];
  for (let row = 0; row < 28; row++) {
    for (let col = 0; col < 28; col++) {
      if (pixels.at(row, col) > 0) {
        first = [Math.min(first[0], row), Math.min(first[1], col)]; last = [Math.max(last[0], row), Math.max(last[1], col)];
      }
    }
  }
  const longer = Math.max(last[0] - first[0] + 1, last[1] - first[1] + 1);
  if (MODEL.kind !== "digit") return longer >= 26 ? pixels.pixels : null;
  const [rowCentre, colCentre] = centreOfMass(pixels);
  const centred = Math.max(Math.abs(rowCentre - 13.5), Math.abs(colCentre - 13.5)) <= 1.5;
  return longer >= 19 && longer <= 21 && centred ? pixels.pixels : null;
}

function preparedPixels(gray) {  // the 28x28 0..1 pixels the network sees
  const already = asInDataset(gray);
  if (already) return already;
  let ink = foreground(gray);
  if (MODEL.kind !== "digit") {
    const item = resized(ink, 28);
    return pasted(item, (28 - item.width) >> 1, (28 - item.height) >> 1);
  }
  return placedLikeMnist(ink);
}

function placedLikeMnist(ink) {  // cropped 0..1 ink (one digit) in a 28x28 field as MNIST's digits are
  if (MODEL.stroke_widths) ink = withStrokesLike(ink, MODEL.stroke_widths);
  const digit = resized(ink, 20), [rowCentre, colCentre] = centreOfMass(digit.map(value => value / 255));
  return pasted(digit, roundHalfEven(13.5 - colCentre), roundHalfEven(13.5 - rowCentre));
}

// ----------------------------------------------------------------------------------------------
// A whole number: every digit in the image, in reading order, as companions/using/numbers.py finds
// them (its settings come in MODEL.numbers), each prepared as one digit is above.
// ----------------------------------------------------------------------------------------------

const N = MODEL.numbers;

function digitsIn(gray, judge) {  // {pieces: [{box, pixels, small, cutFromOne}], unread}
  if (MODEL.kind !== "digit" || asInDataset(gray)) return wholeImage(gray);
  const ink = inkOf(gray), [labels, groups] = joinedPieces(ink);
  if (groups.length === 1) {  // its one piece is the whole image, prepared as one digit always was
    const found = wholeImage(gray);
    if (ratioOf(groups[0]) <= N.SPLITTABLE) return found;
    const [[score], [isDigit]] = judge([found.pieces[0].pixels]);
    const parts = split(ink, labels, groups[0], found.pieces[0], [score, isDigit], judge, true);
    return parts.length === 1 ? found : {pieces: parts.map(part => ({...part, cutFromOne: true})), unread: 0};
  }
  const tallest = Math.max(...groups.map(heightOf)), unread = Math.max(0, groups.length - N.MAX_PIECES);
  const kept = groups.slice(0, N.MAX_PIECES);
  const wholes = kept.map(group => ({...pieceOf(ink, labels, group), small: heightOf(group) < N.SMALL * tallest}));
  const tried = kept.map((_, i) => i).filter(i => !wholes[i].small && ratioOf(kept[i]) > N.SPLITTABLE);
  const judged = new Map();
  if (tried.length) {
    const [scores, areDigits] = judge(tried.map(i => wholes[i].pixels));
    tried.forEach((i, k) => judged.set(i, [scores[k], areDigits[k]]));
  }
  const pieces = [];
  kept.forEach((group, i) => pieces.push(...(judged.has(i) ? split(ink, labels, group, wholes[i], judged.get(i), judge, false) : [wholes[i]])));
  return {pieces: pieces.slice(0, N.MAX_PIECES), unread: unread + Math.max(0, pieces.length - N.MAX_PIECES)};
}
function wholeImage(gray) {
  return {pieces: [{box: [0, 0, gray.width, gray.height], pixels: preparedPixels(gray)}], unread: 0};
}

const heightOf = group => group.box[3] - group.box[1], widthOf = group => group.box[2] - group.box[0];
const ratioOf = group => widthOf(group) / heightOf(group);

function labelled(mask, width, height) {  // scipy.ndimage.label, corners touching: numbered in reading order
  const labels = new Int32Array(width * height);
  let count = 0;
  for (let start = 0; start < labels.length; start++) {
    if (!mask[start] || labels[start]) continue;
    labels[start] = ++count;
    const stack = [start];
    while (stack.length) {
      const at = stack.pop(), row = Math.floor(at / width), col = at % width;
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const y = row + dy, x = col + dx, next = y * width + x;
          if (y < 0 || y >= height || x < 0 || x >= width || !mask[next] || labels[next]) continue;
          labels[next] = count; stack.push(next);
        }
      }
    }
  }
  return [labels, count];
}

function joinedPieces(ink) {  // [each pixel's label, the groups of pieces in reading order]
  const level = f32(f32(N.INK_LEVEL) * ink.max());
  const [labels, count] = labelled(ink.pixels.map(value => value > level), ink.width, ink.height);
  const areas = new Array(count).fill(0), boxes = Array.from({length: count}, () => [Infinity, Infinity, -1, -1]);
  labels.forEach((label, i) => {
    if (!label) return;
    const box = boxes[label - 1], row = Math.floor(i / ink.width), col = i % ink.width;
    areas[label - 1]++;
    box[0] = Math.min(box[0], col); box[1] = Math.min(box[1], row); box[2] = Math.max(box[2], col + 1); box[3] = Math.max(box[3], row + 1);
  });
  const largest = Math.max(...areas);
  const groups = boxes.map((box, i) => ({labels: [i + 1], box})).filter((_, i) => areas[i] >= N.SPECK * largest);
  groups.sort((a, b) => a.box[0] - b.box[0] || a.box[1] - b.box[1]);
  let joined = [], reaching = [];
  for (const group of groups) {
    reaching = reaching.filter(other => other.box[2] > group.box[0]);
    const partner = reaching.find(other => shareColumns(other, group));
    if (partner) join(partner, group);
    else { joined.push(group); reaching.push(group); }
  }
  const tallest = Math.max(...joined.map(heightOf));
  const strokes = joined.filter(group => heightOf(group) < N.SMALL * tallest);
  for (const stroke of joined.length <= 2 * N.MAX_PIECES ? strokes : []) {
    const digit = joined.find(other => isFlag(stroke, other, tallest));
    if (digit) { join(digit, stroke); joined = joined.filter(group => group !== stroke); }
  }
  joined.sort((a, b) => (a.box[0] + a.box[2]) / 2 - (b.box[0] + b.box[2]) / 2 || a.box[1] - b.box[1]);
  return [labels, joined];
}
function shareColumns(first, second) {
  const shared = Math.min(first.box[2], second.box[2]) - Math.max(first.box[0], second.box[0]);
  const apart = Math.max(first.box[1], second.box[1]) - Math.min(first.box[3], second.box[3]);
  const close = apart <= N.JOIN_GAP * Math.max(heightOf(first), heightOf(second));
  return close && shared >= N.JOIN_OVERLAP * Math.min(widthOf(first), widthOf(second));
}
function isFlag(stroke, digit, tallest) {
  const gap = Math.max(stroke.box[0] - digit.box[2], digit.box[0] - stroke.box[2]);
  const aboveMiddle = stroke.box[3] <= (digit.box[1] + digit.box[3]) / 2;
  return heightOf(digit) >= N.SMALL * tallest && gap <= N.FLAG_GAP * tallest && aboveMiddle;
}
function join(group, other) {
  group.labels.push(...other.labels);
  group.box = [Math.min(group.box[0], other.box[0]), Math.min(group.box[1], other.box[1]),
               Math.max(group.box[2], other.box[2]), Math.max(group.box[3], other.box[3])];
}

function split(ink, labels, group, whole, [wholeScore, wholeIsDigit], judge, alone) {  // one piece, or the parts read best
  if ((alone && wholeIsDigit) || (ratioOf(group) <= N.WIDE && wholeScore >= N.READ_WELL)) return [whole];
  const [x0, y0, x1, y1] = group.box;
  const cuts = [new Array(y1 - y0).fill(x0), ...candidateCuts(labels, ink.width, group), new Array(y1 - y0).fill(x1)];
  const last = cuts.length - 1, parts = new Map();
  for (let a = 0; a < last; a++) {
    for (let b = a + 1; b <= last; b++) {
      if ((a === 0 && b === last) || cuts[b][0] - cuts[a][0] > N.MAX_PART * heightOf(group)) continue;
      const part = pieceOf(ink, labels, group, cuts[a], cuts[b]);
      if (part) parts.set(a + "," + b, part);
    }
  }
  if (!parts.size) return [whole];
  const [scores, areDigits] = judge([...parts.values()].map(part => part.pixels));
  const scoreOf = new Map();
  [...parts.keys()].forEach((span, i) => { if (areDigits[i] || !alone) scoreOf.set(span, scores[i]); });
  scoreOf.set("0," + last, wholeScore);
  const best = bestParts(last, scoreOf);
  return best.length === 1 && best[0] === "0," + last ? [whole] : best.map(span => parts.get(span));
}

function bestParts(last, scoreOf) {  // the spans whose scores, less PART_COST each, add up to the most
  const best = new Map([[0, [0, []]]]);
  for (let b = 1; b <= last; b++) {
    let chosen = null;
    for (let a = 0; a < b; a++) {
      if (!best.has(a) || !scoreOf.has(a + "," + b)) continue;
      const way = [best.get(a)[0] + scoreOf.get(a + "," + b) - N.PART_COST, [...best.get(a)[1], a + "," + b]];
      if (!chosen || way[0] > chosen[0] || (way[0] === chosen[0] && way[1].length < chosen[1].length)) chosen = way;
    }
    if (chosen) best.set(b, chosen);
  }
  return best.get(last)[1];
}

function candidateCuts(labels, width, group) {  // straight down the columns crossing the least ink, and bent
  const [x0, y0, x1, y1] = group.box, mine = new Set(group.labels), crossing = new Array(x1 - x0).fill(0);
  for (let row = y0; row < y1; row++) {
    for (let col = x0; col < x1; col++) crossing[col - x0] += mine.has(labels[row * width + col]);
  }
  const spacing = Math.max(1, roundHalfEven(N.CUT_SPACING * heightOf(group))), columns = [];
  const order = crossing.map((_, i) => i).sort((a, b) => crossing[a] - crossing[b] || a - b);
  for (const column of order) {
    if (spacing <= column && column <= widthOf(group) - spacing && columns.every(other => Math.abs(column - other) >= spacing)) {
      columns.push(column);
    }
    if (columns.length === N.CUTS) break;
  }
  columns.sort((a, b) => a - b);
  const unique = new Map();
  for (const cut of [...columns.map(column => new Array(y1 - y0).fill(x0 + column)),
                     ...columns.map(column => bentCut(labels, width, group, column))]) {
    if (!unique.has(cut.join(","))) unique.set(cut.join(","), cut);
  }
  const mean = cut => cut.reduce((sum, value) => sum + value, 0) / cut.length;
  return [...unique.values()].sort((a, b) => mean(a) - mean(b));
}

function bentCut(labels, width, group, column) {  // the cheapest path near `column`, moving a column a row at most
  const [x0, y0, x1, y1] = group.box, mine = new Set(group.labels), height = y1 - y0;
  const reach = Math.max(1, roundHalfEven(N.BEND * heightOf(group)));
  const low = Math.max(0, column - reach), high = Math.min(widthOf(group), column + reach + 1), span = high - low;
  const cost = (row, x) => mine.has(labels[(y0 + row) * width + x0 + low + x]) ? N.INK_COST : 0;
  const blocked = N.INK_COST * height + N.SLANT_COST * (height + span) + 1;
  let total = Array.from({length: span}, (_, x) => cost(0, x));
  const cameFrom = Array.from({length: height}, () => new Int8Array(span));
  for (let row = 1; row < height; row++) {
    const next = new Array(span);
    for (let x = 0; x < span; x++) {
      const options = [(x > 0 ? total[x - 1] : blocked) + N.SLANT_COST, total[x], (x + 1 < span ? total[x + 1] : blocked) + N.SLANT_COST];
      const pick = options.indexOf(Math.min(...options));
      cameFrom[row][x] = pick - 1; next[x] = options[pick] + cost(row, x);
    }
    total = next;
  }
  const ending = total.map((value, x) => value + N.SLANT_COST * Math.abs(low + x - column));
  const path = new Array(height);
  path[height - 1] = ending.indexOf(Math.min(...ending));
  for (let row = height - 1; row > 0; row--) path[row - 1] = path[row] + cameFrom[row][path[row]];
  return path.map(x => x0 + low + x);
}

function dilated(mask, width, height, times) {  // scipy.ndimage.binary_dilation with its cross, `times` over
  let out = Uint8Array.from(mask);
  for (let time = 0; time < times; time++) {
    const source = out;
    out = new Uint8Array(source.length);
    for (let row = 0, i = 0; row < height; row++) {
      for (let col = 0; col < width; col++, i++) {
        out[i] = source[i] || (row > 0 && source[i - width]) || (row + 1 < height && source[i + width]) ||
                 (col > 0 && source[i - 1]) || (col + 1 < width && source[i + 1]) ? 1 : 0;
      }
    }
  }
  return out;
}

function pieceOf(ink, labels, group, leftCut = null, rightCut = null) {  // its ink alone, prepared as one digit
  const [x0, y0, x1, y1] = group.box, isPart = leftCut !== null, mine = new Set(group.labels);
  if (!isPart) { leftCut = new Array(y1 - y0).fill(x0); rightCut = new Array(y1 - y0).fill(x1); }
  const top = Math.max(y0 - N.HALO, 0), bottom = Math.min(y1 + N.HALO, ink.height);
  const left = Math.max(Math.min(...leftCut) - N.HALO, 0), right = Math.min(Math.max(...rightCut) + N.HALO, ink.width);
  const width = right - left, height = bottom - top, at = (row, col) => (top + row) * ink.width + left + col;
  const ours = new Uint8Array(width * height), theirs = new Uint8Array(width * height);
  for (let row = 0, i = 0; row < height; row++) {
    for (let col = 0; col < width; col++, i++) {
      const label = labels[at(row, col)];
      ours[i] = mine.has(label) ? 1 : 0; theirs[i] = label > 0 && !ours[i] ? 1 : 0;
    }
  }
  const near = dilated(ours, width, height, N.HALO);
  let alone = new Gray(width, height);
  for (let row = 0, i = 0; row < height; row++) {
    const cut = Math.min(Math.max(top + row - y0, 0), y1 - y0 - 1);  // rows above or below: the nearest's cut
    for (let col = 0; col < width; col++, i++) {
      const inside = near[i] && !theirs[i] && left + col >= leftCut[cut] && left + col < rightCut[cut];
      alone.pixels[i] = inside ? ink.pixels[at(row, col)] : 0;
    }
  }
  if (alone.max() <= 0) return null;
  const level = f32(f32(N.INK_LEVEL) * alone.max());
  let kept = alone.pixels.map(value => value > level ? 1 : 0);
  if (isPart) {
    kept = withoutFragments(kept, width, height);
    const around = dilated(kept, width, height, N.HALO);
    alone = new Gray(width, height, alone.pixels.map((value, i) => around[i] ? value : 0));
  }
  let first = [Infinity, Infinity], last = [-1, -1];
  kept.forEach((value, i) => {
    if (!value) return;
    const row = Math.floor(i / width), col = i % width;
    first = [Math.min(first[0], row), Math.min(first[1], col)]; last = [Math.max(last[0], row), Math.max(last[1], col)];
  });
  return {box: [left + first[1], top + first[0], left + last[1] + 1, top + last[0] + 1], pixels: placedLikeMnist(cropped(alone))};
}
function withoutFragments(kept, width, height) {  // less the pieces far smaller than the largest
  const [labels, count] = labelled(kept, width, height);
  if (count < 2) return kept;
  const areas = new Array(count).fill(0);
  labels.forEach(label => { if (label) areas[label - 1]++; });
  const largest = Math.max(...areas);
  return labels.map(label => label > 0 && areas[label - 1] >= N.FRAGMENT * largest ? 1 : 0);
}

// ----------------------------------------------------------------------------------------------
// The network: each module's forward pass, and the backward pass to the input ("why")
// ----------------------------------------------------------------------------------------------

class Tensor {  // values of one image: shape [C, H, W] or [N]
  constructor(shape, data) { this.shape = shape; this.data = data || new Float32Array(shape.reduce((a, b) => a * b, 1)); }
}

const FORWARD = {
  conv(m, x) {
    const [channels, height, width] = x.shape, size = m.size, pad = m.padding;
    const outHeight = height + 2 * pad - size + 1, outWidth = width + 2 * pad - size + 1;
    const y = new Tensor([m.out, outHeight, outWidth]), weight = m.weight, input = x.data;
    for (let o = 0; o < m.out; o++) {
      for (let row = 0; row < outHeight; row++) {
        const kyLow = Math.max(0, pad - row), kyHigh = Math.min(size, height + pad - row);
        for (let col = 0; col < outWidth; col++) {
          const kxLow = Math.max(0, pad - col), kxHigh = Math.min(size, width + pad - col);
          let sum = m.bias[o];
          for (let c = 0; c < channels; c++) {
            for (let ky = kyLow; ky < kyHigh; ky++) {
              const w = ((o * channels + c) * size + ky) * size, i = (c * height + row + ky - pad) * width + col - pad;
              for (let kx = kxLow; kx < kxHigh; kx++) sum += weight[w + kx] * input[i + kx];
            }
          }
          y.data[(o * outHeight + row) * outWidth + col] = sum;
        }
      }
    }
    return y;
  },
  batch_norm(m, x) {
    const plane = x.shape[1] * x.shape[2];
    return new Tensor(x.shape, x.data.map((value, i) => value * m.scale[Math.floor(i / plane)] + m.shift[Math.floor(i / plane)]));
  },
  relu: (m, x) => new Tensor(x.shape, x.data.map(value => Math.max(value, 0))),
  leaky_relu: (m, x) => new Tensor(x.shape, x.data.map(value => value > 0 ? value : value * m.slope)),
  elu: (m, x) => new Tensor(x.shape, x.data.map(value => value > 0 ? value : m.alpha * Math.expm1(value))),
  tanh: (m, x) => new Tensor(x.shape, x.data.map(Math.tanh)),
  avg_pool: (m, x) => pool(x, window => (window[0] + window[1] + window[2] + window[3]) / 4),
  max_pool: (m, x) => pool(x, window => Math.max(...window)),
  flatten: (m, x) => new Tensor([x.data.length], x.data),
  linear(m, x) {
    const y = new Tensor([m.out]);
    for (let o = 0; o < m.out; o++) {
      let sum = m.bias[o];
      for (let i = 0; i < m.in; i++) sum += m.weight[o * m.in + i] * x.data[i];
      y.data[o] = sum;
    }
    return y;
  },
};
function pool(x, reduce) {  // a 2x2 window, stride 2
  const [channels, height, width] = x.shape, outHeight = height >> 1, outWidth = width >> 1;
  const y = new Tensor([channels, outHeight, outWidth]);
  for (let c = 0; c < channels; c++) {
    for (let row = 0; row < outHeight; row++) {
      for (let col = 0; col < outWidth; col++) {
        const at = (dy, dx) => x.data[(c * height + 2 * row + dy) * width + 2 * col + dx];
        y.data[(c * outHeight + row) * outWidth + col] = reduce([at(0, 0), at(0, 1), at(1, 0), at(1, 1)]);
      }
    }
  }
  return y;
}

// Each module's gradient with respect to its input, given its input x, output y and the gradient g
// with respect to its output.
const BACKWARD = {
  conv(m, x, y, g) {
    const [channels, height, width] = x.shape, [, outHeight, outWidth] = y.shape, size = m.size, pad = m.padding;
    const gradient = new Tensor(x.shape);
    for (let o = 0; o < m.out; o++) {
      for (let row = 0; row < outHeight; row++) {
        for (let col = 0; col < outWidth; col++) {
          const upstream = g.data[(o * outHeight + row) * outWidth + col];
          if (!upstream) continue;
          for (let c = 0; c < channels; c++) {
            for (let ky = 0; ky < size; ky++) {
              const inRow = row + ky - pad;
              if (inRow < 0 || inRow >= height) continue;
              for (let kx = 0; kx < size; kx++) {
                const inCol = col + kx - pad;
                if (inCol < 0 || inCol >= width) continue;
                gradient.data[(c * height + inRow) * width + inCol] += m.weight[((o * channels + c) * size + ky) * size + kx] * upstream;
              }
            }
          }
        }
      }
    }
    return gradient;
  },
  batch_norm(m, x, y, g) {
    const plane = x.shape[1] * x.shape[2];
    return new Tensor(x.shape, g.data.map((value, i) => value * m.scale[Math.floor(i / plane)]));
  },
  relu: (m, x, y, g) => new Tensor(x.shape, g.data.map((value, i) => y.data[i] > 0 ? value : 0)),
  leaky_relu: (m, x, y, g) => new Tensor(x.shape, g.data.map((value, i) => x.data[i] > 0 ? value : value * m.slope)),
  elu: (m, x, y, g) => new Tensor(x.shape, g.data.map((value, i) => x.data[i] > 0 ? value : value * (y.data[i] + m.alpha))),
  tanh: (m, x, y, g) => new Tensor(x.shape, g.data.map((value, i) => value * (1 - y.data[i] * y.data[i]))),
  avg_pool(m, x, y, g) {
    const [, height, width] = x.shape, gradient = new Tensor(x.shape);
    for (let i = 0; i < gradient.data.length; i++) {
      const c = Math.floor(i / (height * width)), row = Math.floor(i / width) % height, col = i % width;
      gradient.data[i] = g.data[(c * y.shape[1] + (row >> 1)) * y.shape[2] + (col >> 1)] / 4;
    }
    return gradient;
  },
  max_pool(m, x, y, g) {  // to the first largest of each window, as torch does
    const [channels, height, width] = x.shape, gradient = new Tensor(x.shape);
    for (let c = 0; c < channels; c++) {
      for (let row = 0; row < y.shape[1]; row++) {
        for (let col = 0; col < y.shape[2]; col++) {
          let best = -1, bestValue = -Infinity;
          for (const [dy, dx] of [[0, 0], [0, 1], [1, 0], [1, 1]]) {
            const i = (c * height + 2 * row + dy) * width + 2 * col + dx;
            if (x.data[i] > bestValue || Number.isNaN(x.data[i])) { best = i; bestValue = x.data[i]; }
          }
          gradient.data[best] += g.data[(c * y.shape[1] + row) * y.shape[2] + col];
        }
      }
    }
    return gradient;
  },
  flatten: (m, x, y, g) => new Tensor(x.shape, g.data),
  linear(m, x, y, g) {
    const gradient = new Tensor(x.shape);
    for (let o = 0; o < m.out; o++) {
      for (let i = 0; i < m.in; i++) gradient.data[i] += m.weight[o * m.in + i] * g.data[o];
    }
    return gradient;
  },
};

function forward(network, input) {  // every module's input and output, in order
  const passes = [];
  let x = input;
  for (const module of network) {
    const y = FORWARD[module.type](module, x);
    passes.push({module, x, y});
    x = y;
  }
  return passes;
}
function gradientOf(passes, scoreWeights) {  // d(scores . scoreWeights) / d(input)
  let g = new Tensor([scoreWeights.length], Float32Array.from(scoreWeights));
  for (let i = passes.length - 1; i >= 0; i--) g = BACKWARD[passes[i].module.type](passes[i].module, passes[i].x, passes[i].y, g);
  return g;
}

// ----------------------------------------------------------------------------------------------
// The answer, as serve's POST /predict?layers=1 gives it
// ----------------------------------------------------------------------------------------------

function nested(tensor) {  // as JSON arrays, rounded to 6 decimals as serve's are
  const round = value => Math.round(value * 1e6) / 1e6;
  if (tensor.shape.length === 1) return Array.from(tensor.data, round);
  const [channels, height, width] = tensor.shape;
  return Array.from({length: channels}, (_, c) => Array.from({length: height}, (_, row) =>
    Array.from(tensor.data.subarray((c * height + row) * width, (c * height + row + 1) * width), round)));
}
function softmax(values, temperature) {
  const scaled = values.map(value => value / temperature), top = Math.max(...scaled);
  const exps = scaled.map(value => Math.exp(value - top)), total = exps.reduce((a, b) => a + b, 0);
  return exps.map(value => value / total);
}
function notOfKindScore(input) {  // the detector's log-odds of "something else" against the ten classes
  const logits = Array.from(forward(MODEL.detector, input).at(-1).y.data);
  const classes = logits.slice(0, 10), top = Math.max(...classes);
  return logits[10] - (top + Math.log(classes.reduce((sum, value) => sum + Math.exp(value - top), 0)));
}
function inputPng(pixels) {
  const small = document.createElement("canvas");
  small.width = small.height = 28;
  const paint = small.getContext("2d"), image = paint.createImageData(28, 28);
  pixels.forEach((value, i) => { const level = Math.round(value * 255); image.data.set([level, level, level, 255], 4 * i); });
  paint.putImageData(image, 0, 0);
  return small.toDataURL("image/png");
}

function answerFor(gray) {  // the number in the image, as serve's POST /predict?layers=1 answers
  if (gray.width * gray.height > MAX_IMAGE_PIXELS) {
    return {error: `the image is too large (over ${MAX_IMAGE_PIXELS.toLocaleString("en")} pixels)`};
  }
  let found;
  try {
    found = digitsIn(gray, judge);
  } catch (error) {
    if (error instanceof NoInk) return {error: error.message};
    throw error;
  }
  const read = found.pieces.map(piece => reading(networkInput(piece.pixels)));
  const digits = read.map(({passes, ...answer}, i) => {
    const piece = found.pieces[i];
    if (piece.small) Object.assign(answer, {verdict: "not_a_digit", sure: false});
    else if (piece.cutFromOne && answer.sure) Object.assign(answer, {verdict: "not_sure", sure: false});
    return {...answer, box: piece.box, input: inputPng(piece.pixels)};
  });
  const least = leastSure(digits), {box, ...answer} = digits[least];
  const number = digits.filter(digit => digit.verdict !== "not_a_digit").map(digit => digit.name).join("");
  return {
    ...answer, number, digits, ...(found.unread ? {unread: found.unread} : {}),
    ...insideOf(read[least].passes, networkInput(found.pieces[least].pixels)),
  };
}

function networkInput(pixels) {  // 28x28 0..1 pixels normalised like the training data
  return new Tensor([1, 28, 28], pixels.map(value => f32(f32(value - MODEL.mean) / MODEL.std)));
}
function reading(input) {  // the answer for one input, with the forward pass it came from
  const passes = forward(MODEL.classifier, input), probabilities = softmax(Array.from(passes.at(-1).y.data), MODEL.temperature);
  const best = probabilities.indexOf(Math.max(...probabilities));
  let verdict = probabilities[best] < MODEL.unsure_below ? "not_sure" : "sure";
  if (MODEL.detector && notOfKindScore(input) > MODEL.not_a_digit_above) verdict = "not_a_digit";
  return {class: best, name: CLASSES[best], probability: probabilities[best], verdict, sure: verdict === "sure", probabilities, passes};
}
function judge(pixelArrays) {  // the split's judge (companions/using/predict.py): [scores, whether each is a digit]
  const scores = [], areDigits = [];
  for (const pixels of pixelArrays) {
    const input = networkInput(pixels), output = forward(MODEL.classifier, input).at(-1).y.data;
    let score = Math.log(Math.max(Math.max(...softmax(Array.from(output), MODEL.temperature)), 1e-12)), isDigit = true;
    if (MODEL.detector) {
      const detected = notOfKindScore(input);
      score -= N.DETECTOR_WEIGHT * Math.max(0, detected - (MODEL.not_a_digit_above - N.DETECTOR_SLACK));
      isDigit = !(detected > MODEL.not_a_digit_above);
    }
    scores.push(score); areDigits.push(isDigit);
  }
  return [scores, areDigits];
}
function leastSure(digits) {  // the least sure digit read (of the least sure piece, where none is a digit)
  let read = digits.map((_, i) => i).filter(i => digits[i].verdict !== "not_a_digit");
  if (!read.length) read = digits.map((_, i) => i);
  return read.reduce((least, i) => digits[i].probability < digits[least].probability ? i : least);
}
function insideOf(passes, input) {  // every layer's values, and why it answered (companions/reports/inside.py)
  const scores = Array.from(passes.at(-1).y.data);
  const [top, runnerUp] = scores.map((value, index) => [value, index]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).map(pair => pair[1]);
  const towards = Array(scores.length).fill(0), apart = Array(scores.length).fill(0);
  towards[top] = 1; apart[top] = 1; apart[runnerUp] = -1;
  const blank = -MODEL.mean / MODEL.std, ink = input.data.map(value => value - blank);
  const explained = weights => {  // the gradient of the weighted scores times the ink, 28x28
    const gradient = gradientOf(passes, weights).data.map((value, i) => value * ink[i]);
    return nested(new Tensor([1, 28, 28], gradient))[0];
  };
  const layers = [{name: "input", shape: [1, 28, 28], values: nested(input)}];
  for (const {module, y} of passes) {
    if (!module.name) continue;
    const layer = {name: module.name, shape: y.shape, values: nested(y)};
    if (module.name === "conv1") layer.filters = nested(new Tensor([module.out, module.size, module.size], module.weight));
    layers.push(layer);
  }
  return {layers, attribution: explained(towards), runner_up: {class: runnerUp, attribution: explained(apart)}};
}

async function grayOfBlob(blob) {  // an image file (or the canvas's PNG) as Pillow reads it in grayscale
  const bitmap = await createImageBitmap(blob);
  if (bitmap.width * bitmap.height > MAX_IMAGE_PIXELS) return new Gray(bitmap.width, bitmap.height, new Float32Array(0));
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width; canvas.height = bitmap.height;
  const paint = canvas.getContext("2d", {willReadFrequently: true});
  paint.drawImage(bitmap, 0, 0);
  return grayOf(paint.getImageData(0, 0, bitmap.width, bitmap.height).data, bitmap.width, bitmap.height);
}

// The page asks this instead of the server.
async function predictHere(image) {
  try {
    return answerFor(await grayOfBlob(image));
  } catch (error) {
    return {error: "not an image file that can be read"};
  }
}
