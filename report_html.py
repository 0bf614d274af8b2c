"""report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched) with the paper's
figures drawn from a run's report.json and a card for each of its most active atoms.

  write(out)              read out/report.json, write out/report.html (eval.write_report calls it)
  atom_cards(...)         the cards' data, computed from the site and its held-out scans (eval.py --exp atoms)

Glossary
  firing        a held-out position t where the atom's TopK code a_i(t) > 0; firing rate = firings / positions
  class         register / bundle: the atom's median signed cosine to the native write over its firings, split
                by the partition's two-component fit (its threshold) when report.json has one, else by τ;
                null: an atom the partition counts as dead or rare
  promotes      the direct-path logit shift of Eq. (1) at the atom's own firings (h = 0), averaged over them:
                Δℓ_tok = Σ_r c_r ⟨W_O(g ⊙ dec_v[r]), W_U[tok]⟩ with c_r = mean a_i(t)⟨dec_k[r], q̃_t⟩ and g the
                head's mean local gain there (1 where the model gives none); the final norm is left out
  key tokens    the token ids whose mean native key (over held-out positions) has the largest cosine with
                dec_k[0], oriented so that the atom's own firings are positive; shown when the token id explains
                enough of the key's variance for a per-token mean to mean something
  points        the per-firing / per-atom / per-prompt lists of the figure data contract (DESIGN.md §4 names
                the statistics; eval.py's experiments write the lists)
"""

import html
import json
import math

import torch

import svg
from writesae import frob_cos

RED, GREEN, BLUE, GREY = "#d62728", "#2ca02c", "#1f77b4", "#555"
CONTEXT = (12, 3)           # tokens shown before and after a firing
KEY_SHARE_MIN = 0.25        # key tokens are shown when the token id explains at least this share of key variance


def esc(s):
    return html.escape(str(s), quote=True)


# ==== The cards' data (computed once per eval run, stored in report.json under "atoms") ====

def token_text(decode, i):
    """The text of token id i, with line breaks and tabs made visible; '#id' when it does not decode."""
    s = decode([i])
    return f"#{i}" if s is None else s.replace("\n", "↵").replace("\t", "⇥")


def top_contexts(act, ids, decode, n=5, gap=8):
    """The n strongest firings act [blocks,T] (at least `gap` tokens apart in a block), each with its context."""
    out, taken = [], []
    for flat in act.flatten().argsort(descending=True).tolist():
        b, t = divmod(flat, act.shape[1])
        if act[b, t] <= 0 or len(out) == n:
            break
        if any(b == b2 and abs(t - t2) < gap for b2, t2 in taken):
            continue
        lo, hi = max(0, t - CONTEXT[0]), min(act.shape[1], t + CONTEXT[1] + 1)
        taken.append((b, t))
        out.append({"block": b, "t": t, "at": t - lo, "tokens": [token_text(decode, i) for i in ids[b, lo:hi].tolist()],
                    "acts": [round(a, 3) for a in act[b, lo:hi].tolist()]})
    return out


def key_tokens(dk0, keys, ids, sign, decode, n=8, min_count=3):
    """Cosine of the key factor dk0 [K] with the mean native key of each token id (≥ min_count positions);
    keys [N,K], ids [N]. Returns (share of key variance the token id explains, [(text, cos)] top n)."""
    uniq, inv, count = ids.unique(return_inverse=True, return_counts=True)
    mean = torch.zeros(len(uniq), keys.shape[1]).index_add_(0, inv, keys) / count[:, None]   # [U,K]
    share = 1 - (keys - mean[inv]).pow(2).sum() / (keys - keys.mean(0)).pow(2).sum().clamp_min(1e-30)
    ok = count >= min_count
    cos = sign * (mean[ok] @ dk0) / (mean[ok].norm(dim=-1) * dk0.norm()).clamp_min(1e-30)
    top = cos.topk(min(n, len(cos))).indices
    return share.item(), [(token_text(decode, int(uniq[ok][j])), round(cos[j].item(), 3)) for j in top]


def atom_cards(site, blocks, scans, args, native, decode):
    """The data of one card per atom for the args.cards atoms that fire most often on the held-out blocks.
    native(sc) -> the native write factors at every position of a scan; decode(ids) -> text or None."""
    codes = torch.stack([sc["codes"] for sc in scans]).float().cpu()          # [blocks,T,n]
    ids, fires = blocks.cpu(), codes > 0
    count = fires.sum((0, 1))
    order = sorted(range(codes.shape[-1]), key=lambda i: (-int(count[i]), -codes[..., i].sum().item()))
    atoms = [i for i in order[:args.cards] if count[i] > 0]
    nat = [native(sc) for sc in scans]
    keys = torch.cat([k[:, 0] for k, _ in nat]).float().cpu()                 # [N,K] the native key factor
    query = torch.stack([sc["w"]["query"] for sc in scans]).float().cpu()     # [blocks,T,K]
    gains = [sc["w"].get("gain") for sc in scans]
    gain = None if gains[0] is None else torch.stack(gains).float().cpu()     # [blocks,T,V]
    dk, dv = site.dec_k.float().cpu(), site.dec_v.float().cpu()               # [n,r,K], [n,r,V]
    resid = site.W_U.float().cpu() @ site.W_O.float().cpu()                   # [vocab,V]
    cards = []
    for i in atoms:
        a, on = codes[..., i], fires[..., i]                                  # [blocks,T]
        cos = torch.cat([frob_cos(dk[i], dv[i], k.float().cpu()[m], v.float().cpu()[m]) for (k, v), m in
                         zip(nat, on)])                                       # [firings]
        c = (a[on][:, None] * (query[on] @ dk[i].T)).mean(0)                  # [r] mean a·⟨dec_k[r], q̃⟩
        g = gain[on].mean(0) if gain is not None else torch.ones(dv.shape[-1])
        shift = resid @ ((g * dv[i]).T @ c)                                   # [vocab] Eq. (1), h = 0
        sign = 1.0 if (keys[on.flatten()] @ dk[i, 0]).mean() >= 0 else -1.0
        share, near = key_tokens(dk[i, 0], keys, ids.flatten(), sign, decode)
        edges, hist = svg.bin_counts(a[on].tolist(), 16, lo=0.0)
        cards.append({"atom": i, "firings": int(count[i]), "rate": int(count[i]) / on.numel(),
                      "mean_act": a[on].mean().item(), "hist": {"edges": edges, "counts": hist},
                      "median_cos": cos.median().item(), "read": c.tolist(),
                      "contexts": top_contexts(a, ids, decode),
                      **{k: [(token_text(decode, int(j)), round(shift[j].item(), 4)) for j in
                              shift.topk(8, largest=k == "promotes").indices] for k in ("promotes", "suppresses")},
                      "key_share": share, "key_tokens": near})
    return {"positions": fires[..., 0].numel(), "tau": args.tau, "gain": gain is not None, "cards": cards}



# ==== The page ====

CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1340px;margin:0 auto;padding:0 20px 40px}
h1{font-size:24px;margin:18px 0 4px}h2{font-size:20px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:16px;margin:0 0 6px}h4{font-size:13px;margin:10px 0 3px;color:#444;text-transform:uppercase;
letter-spacing:.03em}.meta{color:#555;font-size:13px}.note{color:#8a5300;margin:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px}figure{margin:0;border:1px solid #ddd;border-radius:6px;
padding:10px;background:#fafafa;max-width:640px}figure .row{display:flex;flex-wrap:wrap;gap:6px}
figcaption{font-size:13px;color:#333;max-width:600px}svg{max-width:100%;height:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:14px}
.card{border:1px solid #ccd;border-radius:6px;padding:12px;background:#fff}
.cls{font-size:12px;padding:1px 7px;border-radius:9px;color:#fff;margin-left:6px}
.register{background:#1f77b4}.bundle{background:#9467bd}.null{background:#888}
.top{display:flex;gap:12px;align-items:flex-start}.stats{font-size:13px;margin:0}.stats td{padding:0 8px 1px 0}
.ctx{font:12.5px/1.9 ui-monospace,monospace;white-space:pre-wrap;border-bottom:1px dotted #ddd}
.ctx span{border-radius:2px}.ctx mark{background:#ffb000;border-radius:2px;padding:0 1px}
.ctx sub{font:bold 10px system-ui;color:#7a3d00}.cols{display:flex;gap:18px}.cols>div{flex:1}
.chip{font:12.5px ui-monospace,monospace;background:#eef;border-radius:3px;padding:0 4px;white-space:pre}
.tok{display:inline-block;margin:1px 10px 1px 0}.v{font-size:11px;color:#666}
.up .chip{background:#e2f2e2}.down .chip{background:#f8e0e0}dl.help{font-size:13px;columns:2;margin:0}
dl.help dt{font-weight:600}dl.help dd{margin:0 0 6px 0;break-inside:avoid}
"""


def fmt(x, d=3):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}g}"


def note(text):
    return f'<p class="note">{esc(text)}</p>'


def figure(title, body, caption, **data):
    attrs = "".join(f' data-{k}="{esc(v)}"' for k, v in data.items())
    return f'<figure{attrs}><h3>{esc(title)}</h3>{body}<figcaption>{caption}</figcaption></figure>'


def fig_subst(r):
    """The paper's Fig. 3a: KL_delete and KL_random against KL_atom per firing, log-log, y = x."""
    p = r["points"]
    a, d, rnd = p["kl_atom"], p["kl_delete"], p["kl_random"]
    n, win = len(a), sum(x < y for x, y in zip(a, d)) / max(len(a), 1)
    off = sum(not (x > 0 and y > 0) for x, y in zip(a + a, d + rnd))
    plot = svg.scatter([("delete the write", RED, a, d), ("random, atom's norm", GREEN, a, rnd)],
                       "KL_atom (nats, log)", "KL of the control (nats, log)", log=True, identity=True)
    cap = (f"n = {n} firings (row “{esc(p['row'])}”). A point is one firing: x = KL(p_base ‖ p) with the "
           "atom's term substituted for the native write, y = the same KL with the write deleted (red) or "
           "replaced by a random matrix of the atom term's norm (green). Points above the dashed y = x line: the "
           f"atom keeps the output closer to the model's own than the control. KL_atom &lt; KL_delete at "
           f"{100 * win:.1f}% of these firings.") + (f" {off} points with a zero KL are off the log axes." if off else "")
    return figure("Substitution test (the paper's Fig. 3a)", plot, cap, n=n)


def fig_closed(r):
    """Predicted against measured Δℓ per horizon h, with R² as the experiment reports it."""
    plots, first = [], None
    for h, c in r["points"].items():
        first = first or c
        plots.append(f'<div data-h="{esc(h)}" data-n="{len(c["pred"])}" data-r2="{c["r2"]}">' + svg.scatter(
            [("", BLUE, c["pred"], c["meas"])], "predicted Δℓ (logits)", "measured Δℓ (logits)", identity=True,
            w=300, h=270) + f'<div class="meta">h = {esc(h)}: R² = {c["r2"]:.3f}, n = {len(c["pred"])}</div></div>')
    cap = (f"A point is one (prompt, atom): the logit change of the atom's top token h positions after adding "
           f"ε·A_i to the state at ε = {esc(first['eps'])}, measured by the model (y) and predicted by Eq. (1) "
           f"with the predictor “{esc(first['predictor'])}” (x). On the dashed y = x line the closed form is exact.")
    return figure("Closed-form logit shift: predicted vs measured Δℓ (Eq. 1)",
                  f'<div class="row">{"".join(plots)}</div>', cap)


def gauss(m, v, w):
    return lambda x: w * math.exp(-0.5 * (x - m) ** 2 / v) / math.sqrt(2 * math.pi * v)


def fig_partition(r):
    """Per-atom median cosines with the two-component mixture and its threshold."""
    fit = {**r, **r["points"]}
    med, thr, tau = fit["median_cos"], fit.get("threshold"), fit.get("tau")
    edges, counts = svg.bin_counts(med, 30)
    curves, lines = [], []
    if all(k in fit for k in ("means", "vars", "weights")):
        comp = [gauss(*z) for z in zip(fit["means"], fit["vars"], fit["weights"])]
        curves = [("bundle component", "#9467bd", comp[0]), ("register component", BLUE, comp[1]),
                  ("mixture", "#222", lambda x: comp[0](x) + comp[1](x))]
    if thr is not None:
        lines.append((f"threshold {thr:.3f}", RED, thr))
    if tau is not None:
        lines.append((f"τ = {tau:g}", GREY, tau))
    plot = svg.histogram(edges, counts, "median cosine of the atom with the native write", "atoms",
                         curves, lines, w=520)
    cut = thr if thr is not None else tau
    reg = sum(x >= cut for x in med) if cut is not None else None
    cap = (f"n = {len(med)} alive atoms. Each atom counts once, at the median signed cosine between its matrix and "
           "the native write over its firings. The curves are the fitted two-component Gaussian mixture (scaled "
           "to counts); the red line is where its weighted components cross."
           + (f" {reg} atoms lie at or above it (registers), {len(med) - reg} below (bundles)." if reg is not None
              else ""))
    return figure("Register / bundle partition (the paper's Fig. 2a)", plot, cap, n=len(med))


def fig_effects(r, what):
    """Bars with CIs of the experiment's effects, one panel per unit."""
    units = {}
    for e in r["effects"]:
        units.setdefault(e["unit"], []).append(e)
    plots = [svg.bars([(f"{e['name']} (n = {e['n']})", e["value"], *e["ci"], BLUE if j == 0 else GREY)
                       for j, e in enumerate(es)], u, w=560, label_w=290) for u, es in units.items()]
    cap = ("Bar: the estimate; whisker: its 95% CI; n: the units each estimate is over. The first bar is the "
           "experiment's primary quantity. " + "; ".join(f"{esc(e['name'])} = {fmt(e['value'])} "
                                                         f"[{fmt(e['ci'][0])}, {fmt(e['ci'][1])}]" for e in r["effects"]))
    return figure(what, "".join(plots), cap)


FIGURES = [  # (experiment, the field its figure needs, renderer, ...)
    ("subst", "points", fig_subst), ("closed", "points", fig_closed), ("partition", "points", fig_partition),
    ("erase", "effects", lambda r: fig_effects(r, "Erasure: removing the atom's write at its firings")),
    ("install", "effects", lambda r: fig_effects(r, "Install: writing a target token's direction")),
]


def figures(report):
    out = []
    for exp, field, fn in FIGURES:
        r = report.get(exp)
        if r is None:
            out.append(note(f"{exp}: not in this report (python eval.py --exp {exp} runs it)."))
        elif "error" in r:
            out.append(note(f"{exp}: skipped, the experiment failed: {r['error']}"))
        elif field not in r:
            out.append(note(f"{exp}: skipped, report.json has no “{field}” for it (an older eval.py wrote it)."))
        else:
            out.append(fn(r))
    notes = [x for x in out if x.startswith("<p")]
    return '<div class="figs">' + "".join(x for x in out if not x.startswith("<p")) + "</div>" + "".join(notes)


# ==== Atom cards ====

HELP = [
    ("fires", "the share of held-out token positions where the atom is in the SAE's TopK code; the histogram "
              "shows its activation a_i(t) at those firings"),
    ("class", "register: the atom's matrix points like the write the model makes there (median signed cosine "
              "with the native write over its firings at or above the threshold); bundle: below it; null: dead"),
    ("top contexts", "held-out text around its strongest firings; the orange token is the firing position "
                     "(the state after that token's write) with the activation below it; shaded tokens fire "
                     "more weakly (hover for the value)"),
    ("promotes / suppresses", "Eq. (1) without running the model: the mean direct-path logit change the atom "
                              "causes at its own firings, a·⟨dec_k, q̃⟩·⟨W_O(g ⊙ dec_v), W_U[tok]⟩ (logits)"),
    ("key tokens", "the tokens whose mean key (over held-out text) is closest in cosine to the atom's key side: "
                   "what the atom reads and writes on"),
    ("substitution", "at the firings the substitution test drew for this atom: how often putting the atom's term "
                     "in place of the native write changes the output less than deleting the write"),
]


def chip(text):
    return f'<span class="chip">{esc(text.replace(" ", "␣"))}</span>'


def context_line(c):
    peak = max(max(c["acts"]), 1e-30)
    parts = []
    for j, (s, a) in enumerate(zip(c["tokens"], c["acts"])):
        if j == c["at"]:
            parts.append(f"<mark>{esc(s)}<sub>{a:.2f}</sub></mark>")
        elif a > 0:
            parts.append(f'<span style="background:rgba(255,176,0,{0.15 + 0.5 * a / peak:.2f})" '
                         f'title="a = {a:.3f}">{esc(s)}</span>')
        else:
            parts.append(esc(s))
    return f'<div class="ctx">{"".join(parts)}</div>'


def classify(card, report, tau):
    """(class, how it was decided): the partition's fit when report.json has it, else the τ rule."""
    p = report.get("partition") or {}
    if "points" in p and "error" not in p:
        fit = {**p, **p["points"]}
        cos = dict(zip(fit["atoms"], fit["median_cos"]))
        if card["atom"] not in cos:
            return "null", "dead or rare in the partition"
        if fit.get("threshold") is not None:
            return ("register" if cos[card["atom"]] >= fit["threshold"] else "bundle",
                    f"two-component fit, threshold {fit['threshold']:.3f}")
    return ("register" if card["median_cos"] >= tau else "bundle"), f"rule cos ≥ τ = {tau:g}"


def subst_by_atom(report):
    """{atom: (wins, n)} from the substitution test's per-firing points (win = KL_atom < KL_delete)."""
    p = (report.get("subst") or {}).get("points")
    out = {}
    for i, a, d in zip(p["atom"], p["kl_atom"], p["kl_delete"]) if p else ():
        w, n = out.get(i, (0, 0))
        out[i] = (w + (a < d), n + 1)
    return out


def card(c, report, atoms, wins):
    cls, how = classify(c, report, atoms["tau"])
    e, k = c["hist"]["edges"], c["hist"]["counts"]
    hist = svg.histogram(e, k, "activation a_i(t)", "firings", w=250, h=170)
    w, n = wins.get(c["atom"], (None, 0))
    sub = (f"wins at {w} of {n} firings ({100 * w / n:.0f}%)" if n else
           "not among the firings tested" if wins else "not run")
    rows = [("fires", f"{100 * c['rate']:.2f}% of positions ({c['firings']} of {atoms['positions']})"),
            ("mean activation", fmt(c["mean_act"])), ("median cos to native write", fmt(c["median_cos"])),
            ("class decided by", how), ("substitution", sub)]
    stats = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in rows)
    ctx = "".join(map(context_line, c["contexts"]))
    effect = "".join(f'<div class="{cl}"><h4>{t}</h4>' + "".join(
        f'<span class="tok">{chip(s)} <span class="v">{v:+.3g}</span></span>' for s, v in c[key]) + "</div>"
        for cl, t, key in (("up", "promotes", "promotes"), ("down", "suppresses", "suppresses")))
    if c["key_share"] >= KEY_SHARE_MIN:
        keys = "".join(f'<span class="tok">{chip(s)} <span class="v">{v:.2f}</span></span>'
                       for s, v in c["key_tokens"])
    else:
        keys = f'<span class="meta">not shown: here a key depends more on context than on its token</span>'
    keys += f' <span class="v">(token id explains {100 * c["key_share"]:.0f}% of key variance)</span>'
    return (f'<section class="card" id="atom-{c["atom"]}"><h3>Atom {c["atom"]}<span class="cls {cls}">{cls}'
            f'</span></h3><div class="top"><div>{hist}</div><table class="stats">{stats}</table></div>'
            f'<h4>top contexts</h4>{ctx}<div class="cols">{effect}</div>'
            f'<h4>key tokens (cosine with the key side)</h4><div>{keys}</div></section>')


def cards(report):
    atoms = report.get("atoms")
    if atoms is None:
        return note("No atom cards in this report: python eval.py --exp atoms (--cards N) adds them.")
    if "error" in atoms:
        return note(f"atoms: skipped, the experiment failed: {atoms['error']}")
    wins = subst_by_atom(report)
    helptext = "".join(f"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>" for a, b in HELP)
    return (f'<p>The {len(atoms["cards"])} atoms that fire most often on the held-out text, most frequent first.'
            f'</p><dl class="help">{helptext}</dl><div class="cards">'
            + "".join(card(c, report, atoms, wins) for c in atoms["cards"]) + "</div>")


def page(report):
    m = report.get("meta", {})
    title = f"WriteSAE report: {m.get('model', '?')} layer {m.get('layer', '?')} head {m.get('head', '?')}"
    setup = " · ".join(esc(f"{k}: {m[k]}") for k in ("arch", "write", "sae", "data", "seed") if k in m)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><h1>{esc(title)}</h1><p class="meta">{setup}</p><p class="meta">The numbers behind every '
            'figure are in <a href="report.json">report.json</a>; the tables with the paper\'s values in '
            '<a href="report.md">report.md</a>. Jump to the <a href="#cards">atom cards</a>.</p>'
            f'<h2>Figures</h2>{figures(report)}<h2 id="cards">Atom cards</h2>{cards(report)}</body></html>\n')


def write(out):
    """report.html beside out/report.json, drawn from it alone."""
    report = json.loads((out / "report.json").read_text())
    (out / "report.html").write_text(page(report), encoding="utf-8")
