"""report.html: one self-contained page (inline CSS and SVG; no script, nothing fetched) with the
paper's figures drawn from a run's report.json and a card for each of its most active atoms.

  write(out)        read out/report.json, write out/report.html (eval.write_report calls it)
  atom_cards(...)   the cards' data, from the site and its held-out scans (eval.py --exp atoms)

Glossary
  firing       a held-out position t where the atom's TopK code a_i(t) > 0; firing rate = firings
               / positions
  class        register / bundle: the atom's median signed cosine to the native write over its
               firings, split at the partition's threshold (where its two fitted components
               cross) when report.json has one, else at τ; null: an atom the partition counts as
               dead or rare
  promotes     Eq. (1)'s direct-path logit shift at the atom's own firings (h = 0), averaged:
               Δℓ_tok = Σ_r c_r ⟨W_O(g ⊙ dec_v[r]), W_U[tok]⟩ with c_r = mean a_i(t)⟨dec_k[r], q̃_t⟩
               and g the head's mean local gain there (1 where the model gives none); the final
               norm is left out
  key tokens   the token ids whose mean native key over the held-out positions has the largest
               cosine with dec_k[0], its sign chosen so that the atom's own firings are positive;
               shown when the token id explains at least KEY_SHARE_MIN of the keys' variance
  points       the per-firing / per-atom / per-prompt lists each experiment writes for a figure
"""

import html
import json
import math

import torch

import svg
from writesae import frob_cos

RED, GREEN, BLUE, GREY = "#d62728", "#2ca02c", "#1f77b4", "#555"
CONTEXT = (12, 3)      # tokens shown before and after a firing
KEY_SHARE_MIN = 0.25   # the share of key variance the token id must explain to list key tokens


def esc(s):
    return html.escape(str(s), quote=True)


# ==== The cards' data (computed in an eval run, stored in report.json under "atoms") ====

VISIBLE = {"\n": "↵", "\t": "⇥"}


def token_text(decode, i):
    """Token id i's text with line breaks, tabs and other unprintable characters made visible;
    '#id' where it does not decode or decodes to nothing."""
    s = decode([i])
    s = "".join(VISIBLE.get(ch, ch if ch.isprintable() else ascii(ch)[1:-1]) for ch in s or "")
    return s or f"#{i}"


def top_contexts(act, ids, decode, n=5, gap=8):
    """The n strongest firings of act [blocks,T] (≥ gap tokens apart in a block), with contexts."""
    out, taken = [], []
    for flat in act.flatten().argsort(descending=True).tolist():
        b, t = divmod(flat, act.shape[1])
        if act[b, t] <= 0 or len(out) == n:
            break
        if any(b == b2 and abs(t - t2) < gap for b2, t2 in taken):
            continue
        lo, hi = max(0, t - CONTEXT[0]), min(act.shape[1], t + CONTEXT[1] + 1)
        taken.append((b, t))
        out.append({"block": b, "t": t, "at": t - lo,
                    "tokens": [token_text(decode, i) for i in ids[b, lo:hi].tolist()],
                    "acts": [round(a, 3) for a in act[b, lo:hi].tolist()]})
    return out


def token_keys(keys, ids, min_count=3):
    """The mean key of each token id seen ≥ min_count times, and the share of the keys' variance
    the token id explains.  keys [N,K], ids [N] -> token ids [U], mean keys [U,K], share"""
    uniq, inv, count = ids.unique(return_inverse=True, return_counts=True)
    mean = torch.zeros(len(uniq), keys.shape[1]).index_add_(0, inv, keys) / count[:, None]  # [U,K]
    resid = (keys - mean[inv]).pow(2).sum() / (keys - keys.mean(0)).pow(2).sum().clamp_min(1e-30)
    ok = count >= min_count
    return uniq[ok], mean[ok], 1 - resid.item()


def ranked(x, ids, decode, top, n=8):
    """The n largest (top) or smallest entries of x as (token text, value); x is indexed by token
    id, or by ids [len(x)] when given."""
    return [(token_text(decode, int(j if ids is None else ids[j])), round(x[j].item(), 4))
            for j in x.topk(min(n, len(x)), largest=top).indices]


def atom_cards(site, blocks, scans, args, native, decode):
    """One card's data for each of the args.cards atoms that fire most on the held-out blocks.
    native(scan) -> the native write factors at every position of a scan; decode(ids) ->
    text|None."""
    codes = torch.stack([scan["codes"] for scan in scans]).float().cpu()      # [blocks,T,n]
    ids, fires = blocks.cpu(), codes > 0
    count = fires.sum((0, 1))
    total = codes.sum((0, 1))
    order = sorted(range(codes.shape[-1]), key=lambda i: (-int(count[i]), -total[i].item()))
    nat = [tuple(f.float().cpu() for f in native(scan))                      # [T,r,K], [T,r,V]
           for scan in scans]                                                 # each
    keys = torch.stack([k[:, 0] for k, _ in nat])                             # [blocks,T,K]
    tok_ids, tok_keys, share = token_keys(keys.flatten(0, 1), ids.flatten())
    query = torch.stack([scan["w"]["query"] for scan in scans]).float().cpu()  # [blocks,T,K]
    gain = None
    if "gain" in scans[0]["w"]:
        gain = torch.stack([scan["w"]["gain"] for scan in scans]).float().cpu()  # [blocks,T,V]
    dk, dv = site.dec_k.float().cpu(), site.dec_v.float().cpu()               # [n,r,K], [n,r,V]
    resid = site.W_U.float().cpu() @ site.W_O.float().cpu()                   # [vocab,V]
    cards = []
    for i in [i for i in order[:args.cards] if count[i] > 0]:
        a, on = codes[..., i], fires[..., i]                                  # [blocks,T]
        cos = torch.cat([frob_cos(dk[i], dv[i], k[m], v[m]) for (k, v), m in zip(nat, on)])
        c = (a[on][:, None] * (query[on] @ dk[i].T)).mean(0)                  # [r] a·⟨dec_k[r], q̃⟩
        g = gain[on].mean(0) if gain is not None else torch.ones(dv.shape[-1])
        shift = resid @ ((g * dv[i]).T @ c)                                   # [vocab] Eq. (1)
        sign = 1.0 if (keys[on] @ dk[i, 0]).mean() >= 0 else -1.0
        kcos = sign * (tok_keys @ dk[i, 0]) / (tok_keys.norm(dim=-1) * dk[i, 0].norm()).clamp_min(
            1e-30)                                                            # [U]
        edges, hist = svg.bin_counts(a[on].tolist(), 16, lo=0.0)
        cards.append({"atom": i, "firings": int(count[i]), "rate": int(count[i]) / on.numel(),
                      "mean_act": a[on].mean().item(), "hist": {"edges": edges, "counts": hist},
                      "median_cos": cos.median().item(), "read": c.tolist(),
                      "contexts": top_contexts(a, ids, decode),
                      "promotes": ranked(shift, None, decode, True),
                      "suppresses": ranked(shift, None, decode, False),
                      "key_tokens": ranked(kcos, tok_ids, decode, True)})
    return {"positions": fires[..., 0].numel(), "tau": args.tau, "gain": gain is not None,
            "key_share": share, "cards": cards}


# ==== The page ====

CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1340px;margin:0 auto;
 padding:0 20px 40px}
h1{font-size:24px;margin:18px 0 4px}
h2{font-size:20px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:16px;margin:0 0 6px}
h4{font-size:12px;margin:10px 0 3px;color:#444;text-transform:uppercase;letter-spacing:.04em}
.meta{color:#555;font-size:13px}.note{color:#8a5300;margin:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:10px;background:#fafafa;
 max-width:640px}
figure .row{display:flex;flex-wrap:wrap;gap:6px}figcaption{font-size:13px;max-width:620px}
svg{max-width:100%;height:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(600px,1fr));gap:14px}
.card{border:1px solid #ccd;border-radius:6px;padding:12px;background:#fff}
.cls{font-size:12px;padding:1px 7px;border-radius:9px;color:#fff;margin-left:8px}
.register{background:#1f77b4}.bundle{background:#9467bd}.null{background:#888}
.top{display:flex;gap:12px;align-items:flex-start}.top table{flex:1}
.stats{font-size:13px;border-collapse:collapse}.stats td{padding:1px 8px 2px 0;vertical-align:top}
.stats td:first-child{color:#555;white-space:nowrap}
.ctx{font:12.5px/1.9 ui-monospace,monospace;white-space:pre-wrap;border-bottom:1px dotted #ddd}
.ctx span{border-radius:2px}.ctx mark{background:#ffb000;border-radius:2px;padding:0 1px}
.ctx sub{font:bold 10px system-ui;color:#7a3d00}.cols{display:flex;gap:18px}.cols>div{flex:1}
.chip{font:12.5px ui-monospace,monospace;background:#eef;border-radius:3px;padding:0 4px;
 white-space:pre}
.tok{display:inline-block;margin:1px 10px 1px 0}.v{font-size:11px;color:#666}
.up .chip{background:#e2f2e2}.down .chip{background:#f8e0e0}
dl.help{font-size:13px;columns:2;margin:0 0 12px}dl.help dt{font-weight:600}
dl.help dd{margin:0 0 6px 0;break-inside:avoid}
"""


def fmt(x, d=3):
    return "–" if x is None or not math.isfinite(x) else f"{x:.{d}g}"


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
                       "KL_atom (nats, log)", "KL of the control (nats, log)", log=True,
                       identity=True)
    cap = (f"n = {n} firings (row “{esc(p['row'])}”). A point is one firing: x = KL(p_base ‖ p) "
           "with the atom's term substituted for the native write, y = the same KL with the write "
           "deleted (red) or replaced by a random matrix of the atom term's norm (green). Above "
           "the dashed y = x line the atom keeps the output closer to the model's own than the "
           f"control does. KL_atom &lt; KL_delete at {100 * win:.1f}% of these firings.")
    if off:
        cap += f" Off the log axes (a zero KL): {off} point{'s' * (off > 1)}."
    return figure("Substitution test (the paper's Fig. 3a)", plot, cap, n=n)


def fig_closed(r):
    """Predicted against measured Δℓ, a panel per horizon h, with R² as the experiment gives it."""
    plots, first = [], next(iter(r["points"].values()))
    for h, c in r["points"].items():
        plot = svg.scatter([("", BLUE, c["pred"], c["meas"])], "predicted Δℓ (logits)",
                           "measured Δℓ (logits)", identity=True, w=300, h=270)
        plots.append(f'<div data-h="{esc(h)}" data-n="{len(c["pred"])}" data-r2="{c["r2"]}">{plot}'
                     f'<div class="meta">h = {esc(h)}: R² = {c["r2"]:.3f}, '
                     f'n = {len(c["pred"])}, predictor “{esc(c["predictor"])}”</div></div>')
    cap = ("A point is one (prompt, atom): the change in the logit of the atom's top token h "
           f"positions after ε·A_i is added to the state (ε = {esc(first['eps'])}), measured by "
           "running the model (y) and predicted with no fitted parameter (x) by the most complete "
           "predictor defined at that h: “exact” (Eq. (1) with the exact in-layer transport and "
           "the norms' Jacobians), else “eq1+gain”, else “eq1” (as printed). On the dashed y = x "
           "line the prediction is exact.")
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
    plot = svg.histogram(edges, counts, "median cosine of the atom with the native write",
                         "atoms", curves, lines, w=520)
    cut = thr if thr is not None else tau
    cap = (f"n = {len(med)} alive atoms. An atom counts once, at the median signed cosine between "
           "its matrix and the native write over its firings. The curves are the fitted "
           "two-component Gaussian mixture, scaled to counts; the red line is where its weighted "
           "components cross.")
    if cut is not None:
        reg = sum(x >= cut for x in med)
        cap += f" {reg} atoms lie at or above it (registers), {len(med) - reg} below (bundles)."
    return figure("Register / bundle partition (the paper's Fig. 2a)", plot, cap, n=len(med))


def fig_effects(r, title):
    """Bars with CIs of the experiment's effects, one panel per unit."""
    units = {}
    for e in r["effects"]:
        units.setdefault(e["unit"], []).append(e)
    plots = [svg.bars([(f"{e['name']} (n = {e['n']})", e["value"], *e["ci"], BLUE if j else RED)
                       for j, e in enumerate(es)], u, w=600, label_w=250)
             for u, es in units.items()]
    cap = ("Bar: the estimate; whisker: its 95% CI; n: the units it is over. The first bar is the "
           "experiment's primary quantity. " + "; ".join(
               f"{esc(e['name'])} = {fmt(e['value'])} [{fmt(e['ci'][0])}, {fmt(e['ci'][1])}]"
               for e in r["effects"]) + ".")
    return figure(title, "".join(plots), cap)


FIGURES = [  # (experiment, the field its figure needs, renderer)
    ("subst", "points", fig_subst), ("closed", "points", fig_closed),
    ("partition", "points", fig_partition),
    ("erase", "effects", lambda r: fig_effects(r, "Erasure: removing the atom at its firings")),
    ("install", "effects", lambda r: fig_effects(r, "Install: writing a target token's direction")),
]


def figures(report):
    figs, notes = [], []
    for exp, field, fn in FIGURES:
        r = report.get(exp)
        if r is None:
            notes.append(note(f"{exp}: not in this report (python eval.py --exp {exp} runs it)."))
        elif "error" in r:
            notes.append(note(f"{exp}: skipped, the experiment failed: {r['error']}"))
        elif field not in r:
            notes.append(note(f"{exp}: skipped, report.json has no “{field}” for it."))
        else:
            figs.append(fn(r))
    return f'<div class="figs">{"".join(figs)}</div>{"".join(notes)}'


# ==== Atom cards ====

HELP = [
    ("fires", "the share of held-out token positions where the atom is in the SAE's TopK code; "
              "the histogram shows its activation a_i(t) at those firings"),
    ("class", "register: the atom's matrix points like the write the model makes there (median "
              "signed cosine with the native write over its firings at or above the threshold); "
              "bundle: below it; null: dead or rare"),
    ("top contexts", "held-out text around its strongest firings; the orange token is the firing "
                     "position (the state right after that token's write), its activation below "
                     "it; shaded tokens fire more weakly (hover for the value)"),
    ("promotes / suppresses", "Eq. (1), without running the model: the mean direct-path logit "
                              "change the atom causes at its own firings, "
                              "a·⟨dec_k, q̃⟩·⟨W_O(g ⊙ dec_v), W_U[tok]⟩, in logits"),
    ("key tokens", "the tokens whose mean key (over the held-out text) is closest in cosine to "
                   "the atom's key side: the tokens whose writes it stores"),
    ("substitution", "at the firings the substitution test drew for this atom: how often putting "
                     "the atom's term in place of the native write changes the output less than "
                     "deleting the write"),
]


def chip(text):
    return f'<span class="chip">{esc(text.replace(" ", "␣"))}</span>'


def context_line(c):
    """The context's tokens: the firing one marked with its activation, others shaded by theirs."""
    peak, parts = max(max(c["acts"]), 1e-30), []
    for j, (s, a) in enumerate(zip(c["tokens"], c["acts"])):
        if j == c["at"]:
            parts.append(f"<mark>{esc(s)}<sub>{a:.2f}</sub></mark>")
        elif a > 0:
            parts.append(f'<span style="background:rgba(255,176,0,{0.12 + 0.5 * a / peak:.2f})" '
                         f'title="a = {a:.3f}">{esc(s)}</span>')
        else:
            parts.append(esc(s))
    return f'<div class="ctx">{"".join(parts)}</div>'


def classify(card, report, tau):
    """(class, how it was decided): the partition's fit when report.json has it, else τ."""
    p = report.get("partition") or {}
    if "points" in p and "error" not in p:
        fit = {**p, **p["points"]}
        cos = dict(zip(fit["atoms"], fit["median_cos"]))
        if card["atom"] not in cos:
            return "null", "dead or rare in the partition"
        if fit.get("threshold") is not None:
            return ("register" if cos[card["atom"]] >= fit["threshold"] else "bundle",
                    f"two-component fit, threshold {fit['threshold']:.3f}")
    return ("register" if card["median_cos"] >= tau else "bundle"), f"cos ≥ τ = {tau:g}"


def subst_by_atom(report):
    """{atom: (wins, n)} from the substitution test's points (win = KL_atom < KL_delete)."""
    p = (report.get("subst") or {}).get("points")
    out = {}
    for i, a, d in zip(p["atom"], p["kl_atom"], p["kl_delete"]) if p else ():
        w, n = out.get(i, (0, 0))
        out[i] = (w + (a < d), n + 1)
    return out


def tokens(pairs, signed):
    return "".join(f'<span class="tok">{chip(s)} <span class="v">{v:+.3g}</span></span>' if signed
                   else f'<span class="tok">{chip(s)} <span class="v">{v:.2f}</span></span>'
                   for s, v in pairs)


def card(c, report, atoms, wins):
    cls, how = classify(c, report, atoms["tau"])
    hist = svg.histogram(c["hist"]["edges"], c["hist"]["counts"], "activation a_i(t)", "firings",
                         w=250, h=170)
    w, n = wins.get(c["atom"], (0, 0))
    sub = f"wins at {w} of {n} firings tested ({100 * w / n:.0f}%)" if n else \
        "none of its firings tested" if wins else "not run"
    rows = [("fires", f"{100 * c['rate']:.2f}% ({c['firings']} / {atoms['positions']})"),
            ("mean activation", fmt(c["mean_act"])),
            ("median cos to native write", fmt(c["median_cos"])), ("class by", how),
            ("read where it fires", "a·⟨dec_k, q̃⟩ = " + ", ".join(map(fmt, c["read"]))),
            ("substitution", sub)]
    stats = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in rows)
    effect = "".join(f'<div class="{cl}"><h4>{cl_name}</h4>{tokens(c[cl_name], True)}</div>'
                     for cl, cl_name in (("up", "promotes"), ("down", "suppresses")))
    keys = (f"<h4>key tokens (cosine with the key side)</h4><div>{tokens(c['key_tokens'], False)}"
            "</div>" if atoms["key_share"] >= KEY_SHARE_MIN else "")
    return (f'<section class="card" id="atom-{c["atom"]}"><h3>Atom {c["atom"]}'
            f'<span class="cls {cls}">{cls}</span></h3><div class="top"><div>{hist}</div>'
            f'<table class="stats">{stats}</table></div><h4>top contexts</h4>'
            f'{"".join(map(context_line, c["contexts"]))}<div class="cols">{effect}</div>{keys}'
            "</section>")


def cards(report):
    atoms = report.get("atoms")
    if atoms is None:
        return note("No atom cards in this report: python eval.py --exp atoms adds them.")
    if "error" in atoms:
        return note(f"atoms: skipped, the experiment failed: {atoms['error']}")
    share = atoms["key_share"]
    keys = (f"The token id explains {100 * share:.0f}% of this head's key variance, so "
            + ("each card lists its key tokens." if share >= KEY_SHARE_MIN else
               "a key here depends more on context than on its token: no key tokens are listed."))
    helptext = "".join(f"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>" for a, b in HELP)
    wins = subst_by_atom(report)
    return (f'<p>The {len(atoms["cards"])} atoms that fire most often on the held-out text, most '
            f'frequent first. {esc(keys)}</p><dl class="help">{helptext}</dl><div class="cards">'
            + "".join(card(c, report, atoms, wins) for c in atoms["cards"]) + "</div>")


def page(report):
    m = report.get("meta", {})
    title = (f"WriteSAE report: {m.get('model', '?')} layer {m.get('layer', '?')} "
             f"head {m.get('head', '?')}")
    setup = " · ".join(esc(f"{k}: {m[k]}") for k in ("arch", "write", "sae", "data", "seed")
                       if k in m)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{esc(title)}</title><meta name="viewport" content="width=device-width, '
            f'initial-scale=1"><style>{CSS}</style></head><body><h1>{esc(title)}</h1>'
            f'<p class="meta">{setup}</p><p class="meta">The numbers behind every figure are in '
            '<a href="report.json">report.json</a>, the tables beside the paper\'s values in '
            '<a href="report.md">report.md</a>. Jump to the <a href="#cards">atom cards</a>.</p>'
            f'<h2>Figures</h2>{figures(report)}<h2 id="cards">Atom cards</h2>{cards(report)}'
            "</body></html>\n")


def write(out):
    """report.html beside out/report.json, drawn from it alone."""
    report = json.loads((out / "report.json").read_text())
    (out / "report.html").write_text(page(report), encoding="utf-8")
