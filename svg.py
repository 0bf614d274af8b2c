"""Small SVG charts for report.html: plain strings, no dependency, every text HTML-escaped.

  scatter     points of one or more series; linear or log-log axes; optional y = x line
  histogram   bar counts over bin edges; optional overlaid curves (a density, scaled to counts)
              and vertical lines (a threshold)
  bars        horizontal bars with confidence intervals and a zero line (a forest plot)

Glossary
  Axis        a linear or log10 map from data values to pixels, with its tick values
  series      (label, colour, xs, ys) of one scatter; a legend entry each
  margins     L, R, T, B: the room left around the plot area for tick and axis labels
"""

import html
import math

L, R, T, B = 58, 14, 30, 44  # margins (px): left, right, top, bottom
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def esc(s):
    return html.escape(str(s), quote=True)


def num(x):
    """A short tick label: 1500 -> 1.5k, 2e6 -> 2M, 0.0001 -> 1e-4."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.0e}".replace("e-0", "e-")
    return f"{x:.3g}"


class Axis:
    """Data [lo, hi] onto pixels [a, b] (b < a for a y axis), log10 or linear."""

    def __init__(self, lo, hi, a, b, log=False):
        f = math.log10 if log else float
        self.lo, self.hi, self.a, self.b, self.log, self.f = f(lo), f(hi), a, b, log, f
        if self.hi <= self.lo:  # one value: widen so that it sits in the middle
            self.lo, self.hi = self.lo - 0.5, self.hi + 0.5

    def __call__(self, x):
        return self.a + (self.f(x) - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self, n=5):
        """About n round values in the range: decades (log axis) or steps of 1, 2 or 5 × 10^k."""
        if self.log:
            k = range(math.ceil(self.lo), math.floor(self.hi) + 1)
            step = max(1, len(k) // n)
            return [10.0 ** e for e in k[::step]] or [10 ** ((self.lo + self.hi) / 2)]
        raw = (self.hi - self.lo) / n
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
        first, last = math.ceil(self.lo / step - 1e-9), math.floor(self.hi / step + 1e-9)
        return [i * step for i in range(first, last + 1)]


def padded(lo, hi, log=False, pad=0.04):
    """A range around [lo, hi] with a little room on each side (multiplicative on a log axis)."""
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    d = (hi - lo) * pad or 0.5
    lo, hi = lo - d, hi + d
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def frame(w, h, xa, ya, xlabel, ylabel, body, legend=(), left=L, yticks=True):
    """The outer svg: plot-area box, grid and ticks, axis labels, the body, then a legend
    [(label, colour)] in one row above the plot."""
    x0, x1, y0, y1 = left, w - R, h - B, T
    out = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" {FONT} role="img">',
           f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="#fff" '
           'stroke="#888"/>']
    for v in xa.ticks():
        x = xa(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y0}" stroke="#eee"/>'
                   f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 4}" stroke="#888"/>'
                   f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{esc(num(v))}</text>')
    for v in ya.ticks() if yticks else ():
        y = ya(v)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<line x1="{x0 - 4}" x2="{x0}" y1="{y:.1f}" y2="{y:.1f}" stroke="#888"/>'
                   f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(num(v))}</text>')
    out += body
    out.append(f'<text x="{(x0 + x1) / 2}" y="{h - 8}" text-anchor="middle">{esc(xlabel)}</text>'
               f'<text transform="translate(13 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">'
               f'{esc(ylabel)}</text>')
    x = x0
    for label, colour in legend:
        out.append(f'<rect x="{x}" y="{y1 - 19}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{y1 - 10}">{esc(label)}</text>')
        x += 30 + 7 * len(label)  # a little more than the label's width at 12 px
    return "\n".join(out + ["</svg>"])


def scatter(series, xlabel, ylabel, log=False, identity=False, w=440, h=340, r=2.2):
    """series: [(label, colour, xs, ys)]; on a log axis non-positive values are left out (the
    caller counts them); identity: one range on both axes and the dashed y = x line."""
    keep = [(lab, c, [(x, y) for x, y in zip(xs, ys) if not log or (x > 0 and y > 0)])
            for lab, c, xs, ys in series]
    pts = [p for _, _, ps in keep for p in ps] or [(1.0, 1.0)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if identity:
        xs = ys = xs + ys
    xa = Axis(*padded(min(xs), max(xs), log), L, w - R, log)
    ya = Axis(*padded(min(ys), max(ys), log), h - B, T, log)
    body = []
    if identity:
        lo, hi = ((10 ** v if log else v) for v in (max(xa.lo, ya.lo), min(xa.hi, ya.hi)))
        body.append(f'<line x1="{xa(lo):.1f}" y1="{ya(lo):.1f}" x2="{xa(hi):.1f}" '
                    f'y2="{ya(hi):.1f}" stroke="#333" stroke-dasharray="5 4"/>'
                    f'<text x="{xa(hi) - 4:.1f}" y="{ya(hi) + 14:.1f}" text-anchor="end" '
                    'fill="#333">y = x</text>')
    for _, colour, ps in keep:
        body += [f'<circle cx="{xa(x):.1f}" cy="{ya(y):.1f}" r="{r}" fill="{colour}" '
                 'fill-opacity="0.45"/>' for x, y in ps]
    legend = [(lab, c) for lab, c, _, _ in series if len(series) > 1]
    return frame(w, h, xa, ya, xlabel, ylabel, body, legend)


def bin_counts(values, bins=30, lo=None, hi=None):
    """Equal-width bin edges over [lo, hi] (default the data's range) and the count in each bin."""
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    hi = hi if hi > lo else lo + 1e-9
    edges = [lo + (hi - lo) * j / bins for j in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return edges, counts


def histogram(edges, counts, xlabel, ylabel="count", curves=(), vlines=(), w=440, h=300,
              colour="#7a8da6"):
    """Bars of counts over edges; curves [(label, colour, density fn)] drawn as n·width·density
    (the expected count per bin); vlines [(label, colour, x)] dashed, labelled at the top."""
    n, width = sum(counts), edges[1] - edges[0]
    xs = [edges[0] + (edges[-1] - edges[0]) * j / 200 for j in range(201)]
    ys = [[n * width * f(x) for x in xs] for _, _, f in curves]
    ymax = max([max(counts + [0])] + [max(y) for y in ys]) or 1
    at = [x for _, _, x in vlines]
    xa = Axis(*padded(min([edges[0]] + at), max([edges[-1]] + at)), L, w - R)
    ya = Axis(0, ymax * 1.08, h - B, T)
    body = [f'<rect x="{xa(a):.1f}" y="{ya(c):.1f}" width="{max(xa(b) - xa(a) - 1, 0.5):.1f}" '
            f'height="{ya(0) - ya(c):.1f}" fill="{colour}"/>'
            for a, b, c in zip(edges, edges[1:], counts) if c]
    for (_, c, _), y in zip(curves, ys):
        path = " ".join(f"{xa(x):.1f},{ya(v):.1f}" for x, v in zip(xs, y))
        body.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
    for j, (label, c, x) in enumerate(vlines):
        body.append(f'<line x1="{xa(x):.1f}" x2="{xa(x):.1f}" y1="{T}" y2="{h - B}" stroke="{c}" '
                    f'stroke-width="1.5" stroke-dasharray="4 3"/><text x="{xa(x) + 3:.1f}" '
                    f'y="{T + 12 + 14 * j}" fill="{c}">{esc(label)}</text>')
    return frame(w, h, xa, ya, xlabel, ylabel, body, [(lab, c) for lab, c, _ in curves])


def bars(rows, xlabel, w=440, row_h=34, label_w=190):
    """rows: [(name, value, lo, hi, colour)] as horizontal bars from 0, each with a CI whisker."""
    h = T + B + row_h * len(rows)
    vals = [u for _, v, lo, hi, _ in rows for u in (v, lo, hi)
            if u is not None and math.isfinite(u)]
    xa = Axis(*padded(min(vals + [0.0]), max(vals + [0.0]), pad=0.08), label_w, w - R)
    ya = Axis(0, len(rows), T, h - B)
    body = [f'<line x1="{xa(0):.1f}" x2="{xa(0):.1f}" y1="{T}" y2="{h - B}" stroke="#333"/>']
    for j, (name, v, lo, hi, colour) in enumerate(rows):
        y = ya(j + 0.5)
        body.append(f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end">'
                    f'{esc(name)}</text>')
        if v is None or not math.isfinite(v):
            continue
        body.append(f'<rect x="{min(xa(0), xa(v)):.1f}" y="{y - 9:.1f}" '
                    f'width="{abs(xa(v) - xa(0)):.1f}" height="18" fill="{colour}" '
                    'fill-opacity="0.55"/>')
        if all(u is not None and math.isfinite(u) for u in (lo, hi)):
            body.append(f'<path d="M{xa(lo):.1f} {y:.1f}H{xa(hi):.1f}M{xa(lo):.1f} {y - 6:.1f}'
                        f'V{y + 6:.1f}M{xa(hi):.1f} {y - 6:.1f}V{y + 6:.1f}" stroke="#222" '
                        'stroke-width="1.5"/>')
    return frame(w, h, xa, ya, xlabel, "", body, left=label_w, yticks=False)
