"""Run the paper's experiments on a trained WriteSAE and write report.md / report.json beside the paper's numbers.

  python eval.py                                   # every experiment on train.py's default run directory
  python eval.py --model demo/mamba2               # ... on the default run of `train.py --model demo/mamba2`
  python eval.py --run runs/x --exp subst,closed   # some: subst, closed, erase, sign, install, amplify, partition

Glossary (DESIGN.md §4; PAPER_NOTES.md §5–§8)
  site          one (layer ℓ, head h) of the model and the SAE trained on its states S_t [K,V]
  firing        a held-out position t where the SAE code a(t) is non-zero; i* = argmax a(t) its dominant atom;
                an onset firing has a_{i*}(t−1) = 0 (a dominant atom that fires on and on encodes accumulated
                state rather than the write at t)
  W_nat         the native write at t (the run's --write: additive or increment), factors [r,K], [r,V]
  conditions    S'_t = S_t − W_nat + X: atom X = a_{i*} A_{i*}; delete X = 0; random X Gaussian rank-r at the
                atom term's Frobenius norm; *_matched: atom and random at ‖W_nat‖_F
  KL            KL(p_base ‖ p_cond) over the full vocabulary at the edited position t (the read at t already sees
                S'_t), plus the sum over --horizon further positions
  win / chain   KL_atom < KL_delete (ties are losses) / KL_atom < KL_delete < KL_random
  branch        prefill the block once up to t (one cache walked along the block), then cache.repeat(n) and
                one forward of token t (+ horizon) with one edited row per condition
  Δℓ, G, q̃, g   logit shift, product of decays since t0, the read vector, the head's local norm×gate gain
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from models import Capture, Edit, load_model
from writesae import (WriteSAE, atom_write_cosines, frob, frob_cos, install_direction, install_factors,
                      logit_shift_prediction, shift_predictions, substitution_factors)

F64 = torch.float64


# ==== Statistics ====

def wilson(k, n, z=1.96):
    """Wilson score interval of a proportion k/n (Wilson 1927)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (mid - half, mid + half)

def median_mad(x):
    """Median and MAD/√n (the paper's Table 2 cells)."""
    x = torch.as_tensor(x, dtype=F64)
    m = x.median()
    return m.item(), ((x - m).abs().median() / math.sqrt(len(x))).item()

def bootstrap_ci(x, stat="mean", n_boot=5000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean or median of x."""
    x = torch.as_tensor(x, dtype=F64)
    xs = x[torch.randint(len(x), (n_boot, len(x)), generator=torch.Generator().manual_seed(seed))]  # [n_boot,n]
    s = xs.mean(1) if stat == "mean" else xs.median(1).values
    lo, hi = torch.quantile(s, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64))
    return (lo.item(), hi.item())

def sign_stats(d, tie=1e-12):
    """Paired statistics of differences d = KL_delete − KL_atom (> 0 is a win): counts, the sign test, the
    Wilcoxon signed-rank test (normal approximation, mid-ranks), paired dominance (wins − losses)/n."""
    d, normal_p = torch.as_tensor(d, dtype=F64), lambda z: math.erfc(abs(z) / math.sqrt(2))  # two-sided
    wins, losses = int((d > tie).sum()), int((d < -tie).sum())
    nz = d[d.abs() > tie]
    a, n = nz.abs(), len(nz)
    srt = a.sort().values
    r = (torch.searchsorted(srt, a) + torch.searchsorted(srt, a, right=True) + 1) / 2   # mid-ranks
    z_w = (r[nz > 0].sum().item() - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24) if n else 0.0
    z_sign = (abs(wins - losses) - 1) / math.sqrt(n) if n else 0.0
    return {"n": len(d), "wins": wins, "losses": losses, "ties": len(d) - n, "sign_p": normal_p(z_sign),
            "wilcoxon_z": z_w, "wilcoxon_p": normal_p(z_w), "paired_dominance": (wins - losses) / max(len(d), 1)}

def r2(y, pred):
    """1 − SS_res / SS_tot with no fitted parameter."""
    return (1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-30)).item()

def ols_r2(y, x):
    """R² of y on one OLS slope plus intercept (= squared Pearson correlation)."""
    c = torch.corrcoef(torch.stack([y, x]).double())[0, 1]
    return (c * c).item() if torch.isfinite(c) else float("nan")

def gmm_em(x, k, n_init=5, iters=300, seed=0):
    """1-D Gaussian mixture with k components by EM (our own, no sklearn), n_init random starts run as a batch.
    Returns (means, vars, weights, log-likelihood, BIC) of the best start, BIC = −2 log L + (3k − 1) ln n (lower is
    better, sklearn's convention), components sorted by mean."""
    x = torch.as_tensor(x, dtype=F64)
    n, g = len(x), torch.Generator().manual_seed(seed)
    floor = 1e-6 * x.var().item() + 1e-12
    mu = x[torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_init)])]   # [I,k] starts at data points
    var, pi = torch.full_like(mu, x.var().item() + floor), torch.full_like(mu, 1 / k)
    for _ in range(iters):
        logp = -0.5 * ((x[None, :, None] - mu[:, None]) ** 2 / var[:, None] + (2 * math.pi * var[:, None]).log()) \
            + pi[:, None].log()                                               # [I,n,k]
        ll = torch.logsumexp(logp, 2).sum(1)                                  # [I]
        resp = (logp - torch.logsumexp(logp, 2, keepdim=True)).exp()          # E-step
        nk = resp.sum(1).clamp_min(1e-12)                                     # M-step [I,k]
        mu, pi = (resp * x[None, :, None]).sum(1) / nk, nk / n
        var = (resp * (x[None, :, None] - mu[:, None]) ** 2).sum(1) / nk + floor
    b = int(ll.argmax())
    o = mu[b].argsort()
    return mu[b, o].tolist(), var[b, o].tolist(), pi[b, o].tolist(), ll[b].item(), \
        -2 * ll[b].item() + (3 * k - 1) * math.log(n)

def paired_summary(base, cond, n_boot=5000, seed=0):
    """Mean change cond − base with bootstrap CI, sign-flip permutation p (10⁴), paired Cohen's d."""
    base, cond = torch.as_tensor(base, dtype=F64), torch.as_tensor(cond, dtype=F64)
    d = cond - base
    flips = torch.randint(0, 2, (10000, len(d)), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    sd = d.std().item() if len(d) > 1 else float("nan")
    return {"mean_base": base.mean().item(), "mean": cond.mean().item(), "diff": d.mean().item(),
            "ci": bootstrap_ci(d, "mean", n_boot, seed),
            "perm_p": ((flips * d).mean(1).abs() >= d.mean().abs() - 1e-12).double().mean().item(),
            "cohen_d": d.mean().item() / sd if sd and sd > 0 else float("nan")}


# ==== The site: model, layer, head, SAE; one unedited scan per held-out block ====

@dataclasses.dataclass
class Site:
    model: torch.nn.Module
    tok: object
    sae: WriteSAE          # a one-head view of the trained SAE
    layer: int
    head: int
    write: str             # additive | increment: the native write the conditions remove
    dec_k: torch.Tensor    # [n,r,K] decoder atoms (flat: top-r SVD factors)
    dec_v: torch.Tensor    # [n,r,V]
    W_O: torch.Tensor      # [D,V] the head's out-projection columns, fp32
    W_U: torch.Tensor      # [vocab,D] fp32

def make_site(model, tok, sae, sae_index, layer, head, write):
    """The site of head `head`, whose SAE is index sae_index of the (possibly multi-head) trained SAE."""
    one = WriteSAE(dataclasses.replace(sae.cfg, n_sae=1), seed=0)
    one.load_state_dict({n: t[sae_index:sae_index + 1] for n, t in sae.state_dict().items()})
    one = one.to(next(model.parameters()).device).eval()
    if one.cfg.variant == "flat":
        dk, dv = map(torch.stack, zip(*[one.atom(i) for i in range(one.cfg.n_feat)]))
    else:
        dk, dv = one.dec_k[0].detach(), one.dec_v[0].detach()
    return Site(model, tok, one, layer, head, write, dk.float(), dv.float(),
                model.head_out_proj(layer, head).detach().float(), model.lm_head_weight().detach().float())

@torch.no_grad()
def scan(site, ids):
    """One unedited forward of a block ids [T]: the head's writes (time first, head axis removed), ‖S_t‖_F, the
    read S_tᵀq_t [T,V], the SAE codes [T,n], and the final norm's local Jacobian at every position (diagonal gain
    fgain [T,D] times the projection I − proj projᵀ, minus the mean for a LayerNorm)."""
    fn, xs = site.model.final_norm, []
    hook = fn.register_forward_pre_hook(lambda m, a: xs.append(a[0].float()))
    try:
        out = site.model(ids[None], capture=Capture((site.layer,), (site.head,), states=True))
    finally:
        hook.remove()
    w = {n: x[0, :, 0].float() for n, x in out.captures[site.layer].items()}
    S, x, ln = w.pop("states"), xs[-1][0], isinstance(fn, torch.nn.LayerNorm)  # [T,K,V], [T,D]
    xc = x - x.mean(-1, keepdim=True) if ln else x
    var = xc.pow(2).mean(-1, keepdim=True) + fn.eps                           # σ² (LayerNorm) or ms (RMSNorm)
    weight = fn.weight.float() if ln else fn(torch.ones_like(x[:1])).float() * math.sqrt(1 + fn.eps)
    # the final norm's Jacobian at x_t is diag(fgain) P with P = I − x̃x̃ᵀ/(D σ²) (− 11ᵀ/D for LayerNorm)
    return {"w": w, "S_norm": S.flatten(1).norm(dim=-1), "read": torch.einsum("tkv,tk->tv", S, w["query"]),  # [T,V]
            "codes": torch.cat([site.sae.encode(c[None])[0] for c in S.split(1024)]),                     # [T,n]
            "fgain": weight * torch.rsqrt(var), "proj": xc * torch.rsqrt(var * x.shape[-1]), "center": ln}

def unembed(site, sc, t, toks):
    """Rows W_U[tok] carried back through the final norm's exact local Jacobian at t: ⟨row, δr⟩ = Δℓ_tok to
    first order for a residual change δr [D] (the direct path's last step).  toks [..] -> [..,D]"""
    u = site.W_U[toks] * sc["fgain"][t]
    u = u - (u @ sc["proj"][t])[..., None] * sc["proj"][t]
    return u - u.mean(-1, keepdim=True) if sc["center"] else u

def native(site, sc, t):  # the native write W_nat at t (or a slice of positions) as factors  [r,K], [r,V]
    kind = "add" if site.write == "additive" else "inc"
    return sc["w"][f"{kind}_k"][t], sc["w"][f"{kind}_v"][t]

def branches(site, blocks, points, rows_fn, n_after=0, desc=""):
    """For each (b, t) in points: rows_fn(b, t) -> one edit list per row; yields (b, t, logits [n,1+n_after,vocab]).
    Each block's prefix runs once (one cache walked along it); each point is one batched forward of token t
    (+ n_after) from cache.repeat(n), never the whole block again per condition."""
    by = {}
    for b, t in points:
        by.setdefault(b, set()).add(t)
    bar = tqdm(total=sum(map(len, by.values())), desc=desc, leave=False)
    for b in sorted(by):
        cache, pos = None, 0
        for t in sorted(by[b]):
            rows = rows_fn(b, t)
            edits = [dataclasses.replace(e, batch=r) for r, es in enumerate(rows) for e in es]
            x = blocks[b][t:t + 1 + n_after].expand(len(rows), -1)
            with torch.no_grad():
                if t > pos:
                    cache, pos = site.model(blocks[b][None, pos:t], cache=cache, use_cache=True, logits="none").cache, t
                logits = site.model(x, cache=None if cache is None else cache.repeat(len(rows)), edits=edits).logits
            yield b, t, logits
            bar.update()
    bar.close()

def edit(site, pos, op, kv=None, **kw):  # an Edit at this site; kv = (k [r,K], v [r,V]) or None for delete
    k, v = (None, None) if kv is None else kv
    return Edit(site.layer, site.head, pos, op, k, v, write=site.write if op != "add" else None, **kw)

def sample(items, n, gen):  # n of the items, in their order, drawn with gen
    return [items[j] for j in torch.randperm(len(items), generator=gen)[:n].sort().values]

def seeded(args, j):
    return torch.Generator().manual_seed(args.seed + j)


# ==== Experiment 1: the substitution test (§3.2, App. J) ====

CONDS = ("atom", "delete", "random", "atom_matched", "random_matched")

def tie(a, d):  # equal KLs (e.g. an atom X = 0 against delete) are not wins
    return 1e-6 * torch.maximum(a.abs(), d.abs()) + 1e-12

def subst_summary(R, mask, args, key="kl"):
    sfx = "_matched" if args.scale == "matched" else ""
    a, d, r = (R[key][:, CONDS.index(c)][mask] for c in ("atom" + sfx, "delete", "random" + sfx))
    if len(a) == 0:
        return {"n": 0}
    win, n = (d - a) > tie(a, d), len(a)
    chain = win & ((r - d) > tie(d, r))
    med = {c: median_mad(x) for c, x in (("atom", a), ("delete", d), ("random", r))}
    def by_quartile(x):  # win rate in each quartile of x over these firings, with the quartile edges
        edges = torch.quantile(x.double(), torch.tensor([.25, .5, .75], dtype=F64))
        q = torch.bucketize(x.double(), edges)
        return {"edges": edges.tolist(), "win": [win[q == j].float().mean().item() for j in range(4)]}
    out = {"n": n, "win": win.float().mean().item(), "win_ci": wilson(int(win.sum()), n),
           "chain": chain.float().mean().item(), "chain_ci": wilson(int(chain.sum()), n), "median": med,
           "ratio_of_medians": [1.0] + [med[c][0] / max(med["atom"][0], 1e-30) for c in ("delete", "random")],
           "per_firing_ratio": {c: (x / a.clamp_min(1e-30)).median().item() for c, x in (("delete", d), ("random", r))},
           "sign": sign_stats(torch.where((d - a).abs() > tie(a, d), d - a, torch.zeros_like(d))),
           "by_delete_kl": by_quartile(d), "by_cos": by_quartile(R["cos"][mask]),
           "by_norm_ratio": by_quartile(R["norm_ratio"][mask]), "median_cos": R["cos"][mask].median().item()}
    atoms = R["atom"][mask]  # population test: the mean of per-atom win rates (≤ --per-atom firings each)
    per = [w for w in (win[atoms == i][:args.per_atom] for i in atoms.unique()) if len(w) >= args.min_atom_firings]
    if per:
        p = torch.tensor([w.float().mean().item() for w in per])
        out["population"] = {"atoms": len(per), "firings": sum(map(len, per)), "mean": p.mean().item(),
                             "median": p.median().item(), "ci": bootstrap_ci(p, "mean", args.boot, args.seed),
                             "range": [p.min().item(), p.max().item()]}
    return out

def firing_kls(site, blocks, scans, picked, gen, horizon=0):
    """KL(p_base ‖ p_cond) of every condition at each firing (b, t), at t and summed over t..t+horizon."""
    def rows_fn(b, t):
        f = substitution_factors(site.dec_k, site.dec_v, scans[b]["codes"][t], *native(site, scans[b], t), gen)
        return [[]] + [[edit(site, t, "delete" if f[c] is None else "replace", f[c])] for c in CONDS]

    R = {k: [] for k in ("block", "t", "atom", "onset", "kl", "kl_h", "cos", "norm_ratio")}
    for b, t, logits in branches(site, blocks, picked, rows_fn, horizon, "substitution"):
        lp = logits.float().log_softmax(-1)                                   # [1+5,1+h,vocab]
        kl = (lp[:1].exp() * (lp[:1] - lp[1:])).sum(-1)                       # [5,1+h]  KL(p_base ‖ p_cond)
        c = scans[b]["codes"]
        i = int(c[t].argmax())
        atom, nat = (c[t, i] * site.dec_k[i], site.dec_v[i]), native(site, scans[b], t)   # a_{i*}A_{i*}, W_nat
        for k, v in zip(R, (b, t, i, t == 0 or c[t - 1, i].item() == 0, kl[:, 0].cpu(), kl.sum(1).cpu(),
                            frob_cos(*atom, *nat).item(), (frob(*atom) / frob(*nat).clamp_min(1e-30)).item())):
            R[k].append(v)
    return {k: torch.stack(v) if k.startswith("kl") else torch.tensor(v) for k, v in R.items()}

def exp_subst(site, blocks, scans, args):
    """KL of the three conditions at up to --max-firings firings (≤ --per-atom per dominant atom)."""
    gen, cand = seeded(args, 0), {}
    for b, sc in enumerate(scans):
        c = sc["codes"]
        for t in (c.amax(-1) > 0)[:len(c) - args.horizon].nonzero().flatten().tolist():
            cand.setdefault(int(c[t].argmax()), []).append((b, t))
    picked = []
    for i in sorted(cand):
        picked += [cand[i][j] for j in torch.randperm(len(cand[i]), generator=gen)[:args.per_atom].tolist()]
    picked = sample(picked, args.max_firings, gen)
    if not picked:
        raise ValueError("the SAE never fires on the held-out blocks: no firings to substitute")
    R = firing_kls(site, blocks, scans, picked, gen, args.horizon)
    share = torch.cat([frob(*native(site, sc, slice(None))) / sc["S_norm"].clamp_min(1e-30) for sc in scans])
    res = {"scale": args.scale, "horizon": args.horizon, "n_candidates": sum(map(len, cand.values())),
           "mean_decay": torch.cat([sc["w"]["decay"].flatten() for sc in scans]).mean().item(),  # the head's memory
           "median_write_share": share.median().item()}                                      # ‖W_nat‖ / ‖S_t‖
    for name, mask in (("all", torch.ones_like(R["onset"])), ("onset", R["onset"])):
        res[name] = subst_summary(R, mask, args)
        if args.horizon:
            res[name + f"_sum_h{args.horizon}"] = subst_summary(R, mask, args, "kl_h")
    return res


# ==== Experiment 2: the closed-form logit shift (§2, App. A) ====

def exp_closed(site, blocks, scans, args):
    """Add ε·A_i at t0, measure Δℓ at t0 + h on each atom's top direct-path tokens, compare with Eq. (1): R² across
    prompts per (atom, ε) cell, for Eq. (1) as written (nofit: G = Πα, the head norm's diagonal gain) and with one
    OLS slope (ols), and for the exact in-layer transport and head-norm Jacobian (exact, exact_ols). Both leave out
    the layers after the site (the direct path); at h = 0 that is all 'exact' leaves out."""
    scale = torch.cat([sc["S_norm"] for sc in scans]).median().item()        # ε is in units of the median ‖S_t‖_F
    gen, hs, E, T = seeded(args, 1), args.cf_h, torch.tensor(args.eps) * scale, blocks.shape[1]
    eps = site.model.head_norm_eps
    dom = torch.cat([sc["codes"].argmax(-1)[sc["codes"].amax(-1) > 0] for sc in scans])
    counts = torch.bincount(dom.cpu(), minlength=site.dec_k.shape[0])
    atoms = counts.topk(min(args.cf_atoms, int((counts > 0).sum()))).indices.to(site.dec_k.device)
    dk, dv = site.dec_k[atoms], site.dec_v[atoms]                             # [A,r,K], [A,r,V]
    toks = ((dv.sum(1) @ site.W_O.T) @ site.W_U.T).abs().topk(args.cf_tokens, -1).indices  # [A,n_tok]
    A, n_e, Hmax = len(atoms), len(args.eps), max(hs)
    if T < Hmax + 2:
        raise ValueError(f"blocks of {T} tokens are too short for a horizon of {Hmax}")
    points = sample([(b, t) for b in range(len(blocks)) for t in range(1, T - Hmax)], args.cf_prompts, gen)
    meas, pred, exact = [], [], []
    rows_fn = lambda b, t0: [[]] + [[edit(site, t0, "add", (e * dk[a], dv[a]))] for a in range(A)  # noqa: E731
                                    for e in E.tolist()]
    for b, t0, logits in branches(site, blocks, points, rows_fn, Hmax, "closed form"):
        d = (logits[1:] - logits[:1]).float().view(A, n_e, Hmax + 1, -1)[:, :, hs]  # [A,E,Hn,vocab]
        meas.append(torch.stack([d[a][..., toks[a]] for a in range(A)]))      # [A,E,Hn,n_tok]
        p, x = shift_predictions(site.model, dk, dv, scans[b]["w"], t0, hs,
                                 lambda s: unembed(site, scans[b], s, toks), scans[b]["read"], site.W_O, eps)
        pred.append(p), exact.append(x)                                       # [A,Hn,n_tok]  per unit ε
    y = torch.stack(meas).cpu().double()                                      # [P,A,E,Hn,n_tok]
    f, x = (torch.stack(z).cpu().double()[:, :, None] * E.double()[None, None, :, None, None] for z in (pred, exact))
    res = {"atoms": atoms.tolist(), "eps": args.eps, "eps_unit": f"S_t0 + ε·{scale:.4g}·A_i: units of the median "
           f"held-out ‖S_t‖_F, unit-norm factors", "prompts": len(meas), "by_h": {}}
    grid = lambda fn, p, j, k=0: torch.tensor([[fn(y[:, a, e, j, k], p[:, a, e, j, k])  # noqa: E731  [A,E] cells
                                                 for e in range(n_e)] for a in range(A)])
    for j, h in enumerate(hs):
        cells = {kind: grid(fn, p, j) for kind, fn, p in (("nofit", r2, f), ("ols", ols_r2, f), ("exact", r2, x),
                                                          ("exact_ols", ols_r2, x)) if p[..., j, 0].isfinite().all()}
        agree = (y[..., j, 0].sign() == f[..., j, 0].sign())
        res["by_h"][h] = {**{kind: {"median_cell": c.nanmedian().item(), "median_per_atom": c.nanmedian(1)
                                    .values.tolist(), "median_by_eps": c.nanmedian(0).values.tolist(),
                                    "frac_cells_gt_0.95": (c > 0.95).float().mean().item()}
                             for kind, c in cells.items()},
                          "ols_by_token_rank": [grid(ols_r2, f, j, k).nanmedian().item() for k in range(y.shape[-1])],
                          "sign_agreement": agree.double().mean().item(),
                          "sign_agreement_ci": wilson(int(agree.sum()), agree.numel()), "n_sign": agree.numel()}
    return res


# ==== Experiment 3: cache edits (§4, App. I) ====

def exp_erase(site, blocks, scans, args):
    """Remove a_i(t)·A_i at the atom's firings: Δ log p of its preferred token; non-firing control +m·a*·A_i."""
    gen, mult = seeded(args, 2), (1.0, 2.0, 4.0)
    i = args.erase_atom if args.erase_atom >= 0 else int(sum((sc["codes"] > 0).sum(0) for sc in scans).argmax())
    ai = torch.stack([sc["codes"][:, i] for sc in scans]).cpu()               # [blocks,T] the atom's coefficients
    on, off = (sample(m.nonzero().tolist(), args.erase_n, gen) for m in (ai > 0, ai == 0))
    a_star, dk, dv = ai[ai > 0].median(), site.dec_k[i], site.dec_v[i]       # a*: the median natural activation
    lp = torch.stack([logits[:, 0].float().log_softmax(-1).cpu() for _, _, logits in branches(
        site, blocks, on, lambda b, t: [[], [edit(site, t, "add", (-ai[b, t] * dk, dv))]], desc="erase")])
    base, erased = lp[:, 0], lp[:, 1]                                         # [n,vocab]
    pref = int((base - erased).sum(0).argmax())                              # the preferred token (in-sample)
    d = (erased - base)[:, pref]
    ctrl = []
    for _, _, logits in branches(site, blocks, off, lambda b, t: [[]] + [[edit(site, t, "add", (m * a_star * dk, dv))]
                                                                        for m in mult], desc="erase control"):
        lp = logits[:, 0].float().log_softmax(-1)[:, pref]
        ctrl.append((lp[1:] - lp[0]).cpu())
    ctrl = torch.stack(ctrl) if ctrl else torch.zeros(0, len(mult))          # [n,3]
    rank = lambda lp: (lp > lp[:, pref:pref + 1]).sum(1).double().median().item()  # noqa: E731
    return {"atom": i, "a_star": a_star.item(), "preferred_token": pref, "preferred_text": safe_decode(site.tok, [pref]),
            "n": len(d), "median": d.median().item(), "median_ci": bootstrap_ci(d, "median", args.boot, args.seed),
            "mean": d.mean().item(), "wilcoxon_p": sign_stats(d)["wilcoxon_p"], "rank_native": rank(base),
            "rank_patched": rank(erased),
            "control": {f"{m:g}x": {"n": len(ctrl), "median": ctrl[:, j].median().item(),
                                    "wilcoxon_p": sign_stats(ctrl[:, j])["wilcoxon_p"]} for j, m in enumerate(mult)
                        if len(ctrl)}}

def exp_sign(site, blocks, scans, args):
    """Write ‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at one position s; does Δℓ_T at s have the sign of Eq. (1)?"""
    gen, n_tok = seeded(args, 3), args.sign_targets
    pts = sample([(b, s) for b in range(len(blocks)) for s in range(blocks.shape[1])], -(-args.sign_n // n_tok), gen)
    targets = {p: torch.randint(site.W_U.shape[0], (n_tok,), generator=gen).to(site.W_U.device) for p in pts}
    kv = lambda b, s: install_factors(scans[b]["w"], s, install_direction(site.W_O, site.W_U[targets[b, s]]))  # noqa

    def rows_fn(b, s):  # the base row, then one row per target: k [1,K] ⊗ v*_T [1,V]
        k, v = kv(b, s)
        return [[]] + [[edit(site, s, "add", (k, v[j:j + 1]))] for j in range(n_tok)]

    meas, pred = [], []
    for b, s, logits in branches(site, blocks, pts, rows_fn, desc="sign test"):
        T, w, (k, v) = targets[b, s], scans[b]["w"], kv(b, s)
        meas.append((logits[1:, 0].float().gather(-1, T[:, None])[:, 0] - logits[0, 0].float()[T]).cpu())
        pred.append(logit_shift_prediction(1.0, k.expand(n_tok, 1, -1), w["query"][s], w["gain"][s], v[:, None],
                                           site.W_O, unembed(site, scans[b], s, T)[:, None])[:, 0].cpu())
    y, f = torch.cat(meas).double(), torch.cat(pred).double()
    agree = int((y.sign() == f.sign()).sum())
    return {"n": len(y), "sign_agreement": agree / len(y), "ci": wilson(agree, len(y)),
            "pearson_r": torch.corrcoef(torch.stack([y, f]))[0, 1].item(), "median_ratio": (y / f).median().item(),
            "pooled_r2": r2(y, f)}

STRATA = ((10, 100), (100, 1000), (1000, 10000), (10000, None))

def install_edits(site, sc, P, T, m, row=None):
    """Add m·‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at the three positions before P (App. I.6), in batch row `row`."""
    v = install_direction(site.W_O, site.W_U[T])[None]                        # [1,V]
    return [edit(site, s, "add", install_factors(sc["w"], s, v, m), batch=row) for s in range(P - 3, P)]

@torch.no_grad()
def exp_install(site, blocks, scans, args):
    """Write m·‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at the prompt's last three positions, then 20 greedy tokens: is T among them?"""
    gen, P, ms, out = seeded(args, 4), args.install_len, args.install_m, []
    for b in tqdm(range(min(args.install_prompts, len(blocks))), desc="install", leave=False):
        prompt = blocks[b, :P]
        order = site.model(prompt[None]).logits[0, -1].float().log_softmax(-1).argsort(descending=True)
        rows = [(j, int(T), m) for j, (lo, hi) in enumerate(STRATA)            # targets per rank stratum
                for T in sample(order[lo:hi].tolist(), args.install_targets, gen) for m in ms]
        edits = [e for r, (j, T, m) in enumerate(rows, 1) for e in install_edits(site, scans[b], P, T, m, r)]
        x = prompt[None].expand(len(rows) + 1, -1)
        lp = site.model(x, edits=edits).logits[:, -1].float().log_softmax(-1)
        cont = site.model.generate(x, args.gen_len, edits=edits)[:, P:]
        for r, (j, T, m) in enumerate(rows, 1):  # (stratum, m, in edited, in native, first-step lift, rank shift, b)
            out.append((j, m, bool((cont[r] == T).any()), bool((cont[0] == T).any()), (lp[r, T] - lp[0, T]).item(),
                        int((lp[0] > lp[0, T]).sum()) - int((lp[r] > lp[r, T]).sum()), b))
    res = {"prompts": min(args.install_prompts, len(blocks)), "positions": "the prompt's last 3", "by_m": {}}
    for m in ms:
        res["by_m"][f"{m:g}"] = cells = {}
        for j, (lo, hi) in list(enumerate(STRATA)) + [(None, (None, None))]:
            o = [x for x in out if x[1] == m and (j is None or x[0] == j)]
            hit, nat = sum(x[2] for x in o), sum(x[3] for x in o)
            if o:
                cells["pooled" if j is None else f"{lo}-{hi or 'max'}"] = {
                    "n": len(o), "edited": hit / len(o), "edited_ci": wilson(hit, len(o)), "native": nat / len(o),
                    "native_ci": wilson(nat, len(o)), "first_step_lift": torch.tensor([x[4] for x in o]).median().item(),
                    "rank_shift": torch.tensor([float(x[5]) for x in o]).median().item(),
                    "rank_improved": sum(x[5] > 0 for x in o) / len(o), **prompt_level_lift(o, args)}
    return res

def prompt_level_lift(o, args):
    """A prompt's targets share its context, so the lift is tested across prompts: each prompt's mean lift, their
    mean with a bootstrap CI and the Wilcoxon p (PAPER_NOTES §7.3: trials are not independent)."""
    by = {}
    for x in o:
        by.setdefault(x[6], []).append(x[4])
    d = torch.tensor([sum(v) / len(v) for v in by.values()], dtype=torch.float64)
    return {"lift_prompts": len(d), "lift_prompt_mean": d.mean().item(), "lift_wilcoxon_p": sign_stats(d)["wilcoxon_p"],
            "lift_prompt_ci": bootstrap_ci(d, "mean", args.boot, args.seed)}

def safe_decode(tok, ids):
    try:
        return tok.decode(list(ids))
    except Exception:  # a checkpoint without a tokenizer: ids only
        return None

@torch.no_grad()
def exp_amplify(site, blocks, scans, args):
    """Add dose·push_f·A_f for the features most active before class tokens at every decoded position."""
    gen, P = seeded(args, 5), args.amp_prompt_len
    texts = [safe_decode(site.tok, [i]) for i in range(site.W_U.shape[0])]
    if texts[0] is None:
        raise ValueError("--exp amplify needs a tokenizer (the checkpoint has no tokenizer.json)")
    cls = torch.tensor([("\n" in s) if args.amp_class == "newline" else s.strip()[-1:] in (".", "!", "?")
                        for s in texts])                                      # [vocab] newline / sentence end
    codes = torch.cat([sc["codes"][:-1] for sc in scans]).cpu()              # [N,n]
    nxt = cls[torch.cat([b[1:] for b in blocks.cpu()])]                       # the next token is in the class
    if nxt.sum() == 0:
        raise ValueError(f"no {args.amp_class} token in the held-out blocks: pick another --amp-class")
    diff = codes[nxt].mean(0) - codes[~nxt].mean(0)
    top = diff.topk(args.amp_features).indices
    alive = [i for i in (codes > 0).any(0).nonzero().flatten().tolist() if i not in set(top.tolist())]
    rnd, dmax = torch.tensor(sample(alive, args.amp_features, gen), dtype=torch.long), max(args.amp_doses)
    push, x, counts = {"amplify": codes[nxt].mean(0), "random": codes.mean(0)}, blocks[:args.amp_prompts, :P], {}
    for name, feats, dose in tqdm([("baseline", top, 0.0)] + [(f"amplify {d:g}x", top, d) for d in args.amp_doses]
                                  + [(f"random {dmax:g}x", rnd, dmax)], desc="amplify", leave=False):
        p = dose * push[name.split()[0]][feats].to(site.dec_k) if dose else None
        kv = None if p is None else ((p[:, None, None] * site.dec_k[feats]).flatten(0, 1),
                                     site.dec_v[feats].flatten(0, 1))          # Σ_f push_f A_f as [F·r] factors
        edits = [] if kv is None else [edit(site, s, "add", kv) for s in range(P, P + args.amp_len)]
        out = site.model.generate(x, args.amp_len, temperature=args.amp_temperature, edits=edits, seed=args.seed)
        counts[name] = cls[out[:, P:].cpu()].sum(1).double()
    return {"class": args.amp_class, "features": top.tolist(), "random_features": rnd.tolist(),
            "diff": diff[top].tolist(), "prompts": len(x), "tokens": args.amp_len,
            "conditions": {n: paired_summary(counts["baseline"], c, args.boot, args.seed) for n, c in counts.items()
                           if n != "baseline"}, "baseline_mean": counts["baseline"].mean().item()}


# ==== Experiment 4: the register / bundle partition (§3.1) ====

def exp_partition(site, blocks, scans, args):
    """Per-atom median signed cosine to the native write over its firings; EM mixtures with 1 and 2 components."""
    cos, ids = zip(*[atom_write_cosines(site.dec_k, site.dec_v, sc["codes"], *native(site, sc, slice(None)))
                     for sc in scans])
    cos, ids = torch.cat(cos).cpu().double(), torch.cat(ids).cpu()
    order = ids.argsort(stable=True)
    atoms, n_fire = ids[order].unique_consecutive(return_counts=True)
    med = torch.stack([g.median() for g in cos[order].split(n_fire.tolist())])
    keep = n_fire >= args.min_fire
    med, atoms = med[keep], atoms[keep]
    res = {"alive": len(med), "dead_or_rare": site.dec_k.shape[0] - len(med), "min_firings": args.min_fire,
           "tau": args.tau, "above_tau": int((med >= args.tau).sum()), "below_tau": int((med < args.tau).sum()),
           "median_cos": med.median().item()}
    if len(med) >= 3:
        fits = {k: gmm_em(med, k, seed=args.seed) for k in (1, 2)}
        mu, var, pi, _, _ = fits[2]
        reg = torch.stack([-0.5 * ((med - m) ** 2 / v + math.log(2 * math.pi * v)) + math.log(w)
                           for m, v, w in zip(mu, var, pi)], 1).argmax(1) == 1  # in the higher-mean component
        res.update({"delta_bic": fits[2][4] - fits[1][4], "bic": {k: f[4] for k, f in fits.items()},
                    "means": mu, "weights": pi, "registers": int(reg.sum()), "bundles": int((~reg).sum()),
                    **{f"{n}_median_cos": med[s].median().item() if s.any() else float("nan")
                       for n, s in (("register", reg), ("bundle", ~reg))}, "register_atoms": atoms[reg].tolist()})
    return res


# ==== Report ====

DEVIATIONS = [
    "Firings are sampled per dominant atom (≤ --per-atom each, then ≤ --max-firings), not from a fixed feature pool.",
    "KL is KL(p_base ‖ p_cond) (the released code's direction) at the edited position t, whose read already sees S'_t "
    "(in-recurrence edit, PAPER_NOTES §5.4 reading A); the paper's text says KL(p_patched ‖ p_base).",
    "The random condition is Gaussian rank-r at the atom term's norm (coef) or ‖W_nat‖ (matched), drawn per firing.",
    "Closed form: ε is in units of the median held-out ‖S_t‖_F (unit-norm factors); t0 is drawn per prompt; the "
    "eval tokens are each atom's top tokens by |W_U W_O Σ_r dec_v|; every prediction carries W_U[tok] back through "
    "the final norm's exact local Jacobian (the paper's Eq. 1 has no final norm); 'nofit' is Eq. 1 with G = Π decay "
    "and the head norm's diagonal gain; 'ols' adds one slope + intercept per (atom, ε) cell; 'exact' uses the exact "
    "in-layer transport and the head norm's exact local Jacobian, so only later layers are left out; 'exact_ols' adds "
    "the slope to it. R² is over prompts per (atom, ε) cell; the headline gives the median cell and, at the "
    "smallest ε, the median over atoms.",
    "Erasure subtracts a_i(t)·A_i (the atom's contribution), the preferred token is chosen in-sample on those firings.",
    "Sign test and install: key side = the native key k̂_s, size ‖k_s v_sᵀ‖ (no β), added to the state; the install "
    "writes at the prompt's last three positions; targets are drawn per rank stratum of the unedited next-token "
    "distribution.",
    "Amplification: features ranked by mean activation before (not at) a class token, positive differences only; "
    "all conditions share one sampling seed; Wilcoxon and sign tests use normal approximations.",
    "Partition: cosine to the run's native write; atoms with < --min-fire firings count as dead.",
]
PAPER = {  # PAPER_NOTES.md §10; "key arch" overrides "key" for that architecture
    "win": "92.4% [91.6, 93.1] (4,851 firings, Qwen3.5-0.8B L1/L9/L17 H4)",
    "win mamba2": "88.1% [86.8, 89.3] (2,500 firings, Mamba-2-370M L24 H0)",
    "win rwkv7": "47.8% (6,591 firings, RWKV-7-1.5B L12 H0, Table 6)", "chain": "89.5% (4,851)",
    "ratio": "1 : 2.70 : 4.90 (4,851)", "population": "89.8% [88.1, 91.3] (87 atoms, 2,426 firings)",
    "closed": "0.98; all > 0.95 (50 atoms × 4 ε)", "closed mamba2": "−0.07 (Mamba-2 L24 H0)",
    "closed sign": "100%, 0 flips (10,000)", "erase": "−0.116 [−0.265, −0.042] (150 firings)",
    "erase control": "+0.016, p = 0.15 (150)", "sign": "84.6% [83.0, 86.2] (2,000)",
    "install 100-1000": "33.3% → 100% (300)", "install pooled": "8.3% → 25.0% (1,200)", "install lift": "+1.27 nats "
    "(1,200)", "amplify 5x": "16.8 → 11.2, p = 0.001 (40 × 400 tokens)", "random 10x": "16.8 → 19.0",
    "bic": "−296 (316 alive)", "partition": "222 / 94", "register cos": "0.262 (L9 H4)",
    "register cos mamba2": "0.0575 (Mamba-2)", "register cos rwkv7": "0.180 (RWKV-7)",
}

def fmt(x, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"

def headline(res, arch):
    """Rows (quantity, ours, n, 95% CI, the paper's value and n) — the paper's from PAPER_NOTES.md §10."""
    rows, pct, ci = [], lambda x: fmt(x, True), lambda c, p=True: f"[{fmt(c[0], p)}, {fmt(c[1], p)}]"  # noqa: E731
    paper = lambda key: PAPER.get(f"{key} {arch}", PAPER.get(key, ""))  # noqa: E731
    if "subst" in res:
        rows.append(("head memory: mean decay; median ‖W_nat‖ / ‖S_t‖", f"{res['subst']['mean_decay']:.3g}; "
                     f"{res['subst']['median_write_share']:.3g}", "", "", ""))
    for name in ("all", "onset") if "subst" in res else ():
        if (s := res["subst"][name]).get("n"):
            rows += [(f"substitution win ({name} firings)", pct(s["win"]), s["n"], ci(s["win_ci"]), paper("win")),
                     (f"strict chain ({name})", pct(s["chain"]), s["n"], ci(s["chain_ci"]), paper("chain")),
                     (f"median KL atom : delete : random ({name})", " : ".join(f"{r:.2f}" for r in
                                                                            s["ratio_of_medians"]), s["n"], "",
                      paper("ratio")),
                     (f"win by quartile of cos(atom term, W_nat) ({name})", " / ".join(map(pct, s["by_cos"]["win"])),
                      s["n"], "", "")]
            if p := s.get("population"):
                rows.append((f"population test ({name})", pct(p["mean"]), f"{p['atoms']} atoms", ci(p["ci"]),
                             paper("population")))
    if r := res.get("closed"):
        h = 1 if 1 in r["by_h"] else next(iter(r["by_h"]))
        c = r["by_h"][h]
        rows += [(f"closed-form R² ({kind}, h = {h}): median cell; at ε = {r['eps'][0]:g}‖S‖; cells > 0.95",
                  f"{fmt(c[kind]['median_cell'])}; {fmt(c[kind]['median_by_eps'][0])}; "
                  f"{pct(c[kind]['frac_cells_gt_0.95'])}", len(r["atoms"]) * len(r["eps"]), "", paper("closed"))
                 for kind in ("ols", "nofit", "exact", "exact_ols") if kind in c]
        rows.append((f"closed-form sign agreement (h = {h})", pct(c["sign_agreement"]), c["n_sign"],
                     ci(c["sign_agreement_ci"]), paper("closed sign")))
    if e := res.get("erase"):
        rows.append(("erasure: median Δ log p of the preferred token", f"{e['median']:+.3g}", e["n"],
                     ci(e["median_ci"], False), paper("erase")))
        if c4 := e["control"].get("4x"):
            rows.append(("non-firing control 4×: median Δ log p", f"{c4['median']:+.3g} (p = {c4['wilcoxon_p']:.2g})",
                         c4["n"], "", paper("erase control")))
    if s := res.get("sign"):
        rows.append(("single-position sign test", pct(s["sign_agreement"]), s["n"], ci(s["ci"]), paper("sign")))
    for m, cells in res.get("install", {}).get("by_m", {}).items():
        rows += [(f"install m = {m} ({key}): native → edited", f"{pct(c['native'])} → {pct(c['edited'])}", c["n"],
                  ci(c["edited_ci"]), paper(f"install {key}") if m == "3" else "")
                 for key, c in cells.items() if key in ("100-1000", "pooled")]
        if c := cells.get("pooled"):
            rows.append((f"install m = {m}: first-step log-p lift: median; mean over prompts (p)",
                         f"{c['first_step_lift']:+.3g}; {c['lift_prompt_mean']:+.3g} (p = {c['lift_wilcoxon_p']:.2g})",
                         f"{c['n']} ({c['lift_prompts']} prompts)", ci(c["lift_prompt_ci"], False),
                         paper("install lift") if m == "3" else ""))
    if a := res.get("amplify"):
        rows += [(f"{a['class']} count, {name}", f"{c['mean_base']:.3g} → {c['mean']:.3g} (p = {c['perm_p']:.2g}, "
                  f"d = {c['cohen_d']:.2f})", a["prompts"], ci(c["ci"], False), PAPER.get(name, ""))
                 for name, c in a["conditions"].items()]
    if p := res.get("partition"):
        if "delta_bic" in p:
            rows += [("partition ΔBIC (2 vs 1 component)", f"{p['delta_bic']:.3g}", p["alive"], "", paper("bic")),
                     ("registers / bundles (GMM)", f"{p['registers']} / {p['bundles']}", p["alive"], "",
                      paper("partition")),
                     ("register median cosine", fmt(p["register_median_cos"]), p["registers"], "", paper("register cos"))]
        rows.append((f"atoms with median cos ≥ τ = {p['tau']}", f"{p['above_tau']} / {p['alive']}", p["alive"], "", ""))
    return rows

def write_report(out, res, meta, read_path=""):
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, **res}, indent=1, default=float) + "\n")
    L = [f"# WriteSAE evaluation: {meta['model']} layer {meta['layer']} head {meta['head']}", "",
         "| quantity | ours | n | 95% CI | paper (n) |", "|---|---|---|---|---|"]
    L += [f"| {q} | {v} | {n} | {c} | {p} |" for q, v, n, c, p in headline(res, meta["arch"])]
    L += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    L += ["", "## Read path and closed form for this architecture", "", read_path, "",
          "## Deviations from the paper's protocol", ""] + [f"- {d}" for d in DEVIATIONS]
    for name, r in res.items():
        L += ["", f"## {name}", "", "```json", json.dumps(r, indent=1, default=float), "```"]
    (out / "report.md").write_text("\n".join(L) + "\n")


# ==== Command line ====

EXPERIMENTS = {"subst": exp_subst, "closed": exp_closed, "erase": exp_erase, "sign": exp_sign,
               "install": exp_install, "amplify": exp_amplify, "partition": exp_partition}
FLAGS = [  # (flag, default, help): the type is the default's (a type: that type, default None); a list is
    # comma-separated; a tuple lists the choices, the first is the default
    # ---- run, site, output ----
    ("run", None, "train.py run directory (default: train.py's default --out for --model)"),
    ("exp", ",".join(EXPERIMENTS), f"comma list of {', '.join(EXPERIMENTS)}"),
    ("model", None, "the model of train.py's default run, or with --run: override its model (same site)"),
    ("head", int, "which of the run's heads (default its first)"), ("sae", "best", "the run's SAE directory: best or last"),
    ("max-blocks", 64, "held-out blocks scanned"), ("device", "cuda" if torch.cuda.is_available() else "cpu", None),
    ("dtype", ("float32", "bfloat16", "float16"), None), ("seed", 2026, "the paper's substitution / Experiment C seed"),
    ("boot", 5000, "bootstrap resamples"), ("out", None, "report directory (default <run>/eval)"),
    # ---- 1. substitution ----
    ("max-firings", 1000, None), ("per-atom", 30, "firings per dominant atom (population test cap)"),
    ("min-atom-firings", 5, "population test: atoms with at least this many"),
    ("scale", ("coef", "matched"), "headline atom/random scale"),
    ("horizon", 0, "also sum KL over this many further positions"),
    # ---- 2. closed form ----
    ("cf-atoms", 8, "the most frequent dominant atoms"), ("cf-prompts", 64, None), ("eps", [0.1, 0.3, 1.0, 3.0], None),
    ("cf-h", [0, 1, 4, 16], None), ("cf-tokens", 5, "eval tokens per atom (rank 1 is the headline)"),
    # ---- 3. cache edits ----
    ("erase-atom", -1, "default: the atom that fires most"), ("erase-n", 150, None), ("sign-n", 2000, None),
    ("sign-targets", 8, "random target tokens per context"), ("install-prompts", 30, None),
    ("install-len", 32, "prompt tokens (the install uses its last 3)"),
    ("install-targets", 2, "targets per rank stratum and prompt"), ("install-m", [1.5, 3.0, 6.0], None),
    ("gen-len", 20, None), ("amp-class", ("newline", "sentence"), None), ("amp-features", 10, None),
    ("amp-doses", [2.0, 5.0, 10.0], None), ("amp-prompts", 20, None), ("amp-prompt-len", 32, None),
    ("amp-len", 100, None), ("amp-temperature", 0.7, None),
    # ---- 4. partition ----
    ("tau", 0.05, None), ("min-fire", 1, "firings for an atom to count as alive"),
]

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, d, hlp in FLAGS:
        kw = ({"type": d} if isinstance(d, type) else {"choices": d, "default": d[0]} if isinstance(d, tuple) else
              {"type": lambda s, t=type(d[0]): [t(x) for x in s.split(",")], "default": d} if isinstance(d, list)
              else {"default": d} if d is None else {"type": type(d), "default": d})
        p.add_argument(f"--{flag}", help=hlp, **kw)
    args = p.parse_args(argv)
    args.exp = [e for e in args.exp.split(",") if e]
    if bad := [e for e in args.exp if e not in EXPERIMENTS]:
        p.error(f"unknown experiment {bad[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    return args

def evaluate(site, blocks, args):
    """Scan the blocks once, run the chosen experiments; returns {experiment: results}."""
    torch.manual_seed(args.seed)
    blocks = blocks.long().to(site.W_U.device)
    with torch.no_grad():
        scans = [scan(site, b) for b in tqdm(blocks, desc="scan", leave=False)]
        return {name: EXPERIMENTS[name](site, blocks, scans, args) for name in args.exp}

def main(argv=None):
    import data
    import train
    args = parse_args(argv)
    dtype, loaded = getattr(torch, args.dtype), None
    if args.run is None:  # train.py's default run for --model (or its default model) at its default site
        targs = train.parse_args([] if args.model is None else ["--model", args.model])
        loaded = load_model(targs.model, device=args.device, dtype=dtype)
        layer, head = train.default_site(targs.model, loaded[0])
        args.run = train.default_out(targs.model, layer, [head], loaded[0].n_heads)
    run = Path(args.run)
    if not (run / "config.json").exists():
        raise ValueError(f"{run} is not a train.py run directory (no config.json): train one with train.py first")
    cfg = json.loads((run / "config.json").read_text())
    site_cfg, model_name = cfg["site"], args.model or cfg["args"]["model"]
    if loaded is None or model_name != cfg["args"]["model"]:
        loaded = load_model(model_name, device=args.device, dtype=dtype)
    model, tok = loaded
    heads = site_cfg["heads"]
    head = heads[0] if args.head is None else args.head
    if head not in heads:
        raise ValueError(f"head {head} has no SAE in {run}: its heads are {heads}")
    sae = WriteSAE.load(run / args.sae, device=args.device)
    site = make_site(model, tok, sae, heads.index(head), site_cfg["layer"], head, site_cfg["write"])
    blocks, _, val = data.load_blocks(run)
    blocks = blocks[val[:args.max_blocks]]
    res = evaluate(site, blocks, args)
    meta = {"model": model_name, "arch": model.arch, "layer": site.layer, "head": head, "write": site.write,
            "sae": f"{run / args.sae} ({sae.cfg.variant}, n_feat {sae.cfg.n_feat}, k {sae.cfg.k}, rank {sae.cfg.rank})",
            "data": f"{len(blocks)} held-out blocks × {blocks.shape[1]} tokens of {cfg['args'].get('data')}",
            "seed": args.seed, "args": vars(args) | {"run": str(run)}}
    out = Path(args.out) if args.out else run / "eval"
    write_report(out, res, meta, model.READ_PATH)
    print((out / "report.md").read_text().split("\n## Setup")[0])
    return res


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad input: one line that names it
        raise SystemExit(f"eval.py: error: {e}")
