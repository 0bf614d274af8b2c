"""Run the paper's experiments on a trained WriteSAE; write report.md / report.json (and
report.html) beside the paper's numbers.

  python eval.py                                 # every experiment on train.py's default run
  python eval.py --model demo/<arch>             # ... on train.py's default run for that model
  python eval.py --run runs/x --exp subst,closed # some: subst, closed, erase, sign, install,
                                                 #   amplify, partition, atoms
  python eval.py --exp atoms --cards 64          # the atom cards of report.html alone (fast)

Glossary (docs/DESIGN.md, sections 5–8; the paper's §2–§4, App. A, I, J)
  site          one (layer ℓ, head h) of the model and the SAE trained on its states S_t [K,V]
  firing        a held-out position t where the SAE code a(t) is non-zero; i* = argmax a(t) its
                dominant atom; an onset firing has a_{i*}(t−1) = 0 (a dominant atom that fires on
                and on encodes accumulated state rather than the write at t)
  W_nat         the native write at t (the run's --write: additive or increment), factors [r,K],
                [r,V]
  conditions    S'_t = S_t − W_nat + X: atom X = a_{i*} A_{i*}; delete X = 0; random X Gaussian
                rank-r at the atom term's Frobenius norm; *_matched: atom and random at ‖W_nat‖_F
  pool          the substitution's primary firings (docs/DESIGN.md, "Which firings"): --pool
                features, ≤ --pool-cap firings (a_i(t) > 0) each, the dominant atom substituted;
                secondary rows draw ≤ --per-atom per dominant atom, or uniformly over the firing
                positions
  reading       cache edit (B, primary): S_t edited in the cache after an unedited step t, the
                distribution at t + 1; in-recurrence (A): the read at t sees S'_t, at t
                (docs/DESIGN.md, "Where KL is measured")
  KL            KL(p_base ‖ p_cond) over the full vocabulary (the released code's direction) and
                KL(p_cond ‖ p_base) (the paper's text), plus the sum over --horizon more positions
  win / chain   KL_atom < KL_delete (ties are losses) / KL_atom < KL_delete < KL_random
  branch        prefill the block once up to t (one cache walked along the block), then
                cache.repeat(n) and one forward of token t (+ horizon) with one edited row per
                condition
  Δℓ, G, q̃, g   logit shift, product of decays since t0, the read vector, the head's local
                norm×gate gain
  eq1 / +gain   Eq. (1) as printed (G = Π decay, no norm) / with the norms' local gains / exact:
  / exact       the exact in-layer transport and the norms' Jacobians (PREDICTORS); paper_fit:
                App. A's least-squares G per (prompt, atom, token)
  cross-fit     erasure's preferred token is chosen on one half of the passages and tested on
                the other
"""

import argparse
import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

import report_html
from models import Capture, Edit, load_model
from models.common import apply_edits
from models.hub import atomic_write, read_json
from stats import (F64, bootstrap_ci, cluster_bootstrap, crossing, gmm_em, median_mad, ols_r2,
                   paired_summary, r2, sign_stats, wilson)
from train import Parser, count, natural
from writesae import (WriteSAE, atom_write_cosines, frob, frob_cos, install_direction,
                      install_factors, logit_shift_prediction, shift_predictions,
                      substitution_factors)


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
    """The site of head `head`, whose SAE is index sae_index of the (possibly multi-head) trained
    SAE."""
    one = WriteSAE(dataclasses.replace(sae.cfg, n_sae=1), seed=0)
    one.load_state_dict({n: t[sae_index:sae_index + 1] for n, t in sae.state_dict().items()})
    one = one.to(next(model.parameters()).device).eval()
    if one.cfg.variant == "flat":
        dk, dv = map(torch.stack, zip(*[one.atom(i) for i in range(one.cfg.n_feat)]))
    else:
        dk, dv = one.dec_k[0].detach(), one.dec_v[0].detach()
    return Site(model, tok, one, layer, head, write, dk.float(), dv.float(),
                model.head_out_proj(layer, head).detach().float(),
                model.lm_head_weight().detach().float())


@torch.no_grad()
def scan_block(site, ids):
    """One unedited forward of a block ids [T]: the head's writes (time first, head axis removed),
    ‖S_t‖_F, the read S_tᵀq_t [T,V], the SAE codes [T,n], and the final norm's local Jacobian at
    every position (diagonal gain fgain [T,D] times the projection I − proj projᵀ, minus the mean
    for a LayerNorm)."""
    fn = site.model.final_norm
    norm_inputs = []
    hook = fn.register_forward_pre_hook(lambda m, a: norm_inputs.append(a[0].float()))
    try:
        out = site.model(ids[None], capture=Capture((site.layer,), (site.head,), states=True))
    finally:
        hook.remove()
    w = {n: x[0, :, 0].float() for n, x in out.captures[site.layer].items()}
    S = w.pop("states")                                                       # [T,K,V]
    x = norm_inputs[-1][0]                                                    # [T,D]
    ln = isinstance(fn, torch.nn.LayerNorm)
    xc = x - x.mean(-1, keepdim=True) if ln else x
    var = xc.pow(2).mean(-1, keepdim=True) + fn.eps               # σ² (LayerNorm) or ms (RMSNorm)
    ones = torch.ones_like(x[:1])
    weight = fn.weight.float() if ln else fn(ones).float() * math.sqrt(1 + fn.eps)
    # the final norm's Jacobian at x_t is diag(fgain) P with P = I − x̃x̃ᵀ/(D σ²) (− 11ᵀ/D for
    # LayerNorm)
    return {"w": w, "S_norm": S.flatten(1).norm(dim=-1),
            "read": torch.einsum("tkv,tk->tv", S, w["query"]),                        # [T,V]
            "codes": torch.cat([site.sae.encode(c[None])[0] for c in S.split(1024)]),  # [T,n]
            "fgain": weight * torch.rsqrt(var), "proj": xc * torch.rsqrt(var * x.shape[-1]),
            "center": ln}


def unembed(site, scan, t, toks):
    """Rows W_U[tok] carried back through the final norm's exact local Jacobian at t: ⟨row, δr⟩ =
    Δℓ_tok to first order for a residual change δr [D] (the direct path's last step).
    toks [..] -> [..,D]"""
    u = site.W_U[toks] * scan["fgain"][t]
    u = u - (u @ scan["proj"][t])[..., None] * scan["proj"][t]
    return u - u.mean(-1, keepdim=True) if scan["center"] else u


def native(site, scan, t):
    """The native write W_nat at t (or a slice of positions) as factors  [r,K], [r,V]."""
    kind = "add" if site.write == "additive" else "inc"
    return scan["w"][f"{kind}_k"][t], scan["w"][f"{kind}_v"][t]


def branches(site, blocks, points, rows_fn, n_after=0, desc=""):
    """For each (b, t) in points: rows_fn(b, t) -> one edit list per row; yields
    (b, t, logits [n,1+n_after,vocab]). Each block's prefix runs once (one cache walked along it);
    each point is one batched forward of token t (+ n_after) from cache.repeat(n), never the whole
    block again per condition."""
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
                    cache = site.model(blocks[b][None, pos:t], cache=cache, use_cache=True,
                                       logits="none").cache
                    pos = t
                rows_cache = None if cache is None else cache.repeat(len(rows))
                logits = site.model(x, cache=rows_cache, edits=edits).logits
            yield b, t, logits
            bar.update()
    bar.close()


def edit(site, pos, op, kv=None, **kw):
    """An Edit at this site; kv = (k [r,K], v [r,V]) or None for delete."""
    k, v = (None, None) if kv is None else kv
    write = site.write if op != "add" else None
    return Edit(site.layer, site.head, pos, op, k, v, write=write, **kw)


def sample(items, n, gen):
    """n of the items, in their order, drawn with gen."""
    return [items[j] for j in torch.randperm(len(items), generator=gen)[:n].sort().values]


def seeded(args, j):
    """The generator of experiment j: each experiment draws from its own seed."""
    return torch.Generator().manual_seed(args.seed + j)


# ==== Experiment 1: the substitution test (§3.2, App. J) ====

CONDS = ("atom", "delete", "random", "atom_matched", "random_matched")
# firings["kl"] is [firing, reading, direction, condition]: readings B at t + 1 (primary) and A at
# t (see the glossary); directions KL(p_base ‖ p_cond) (primary, the released code's) and
# KL(p_cond ‖ p_base) (the text's)
READINGS = ("cache", "recurrence")
# name: (the firings it draws, its reading); the first is the headline's primary row
SUBST_ROWS = {
    "pool": ("pool", "cache"), "pool_recurrence": ("pool", "recurrence"),
    "pool_onset": ("pool", "cache"), "per_atom": ("per_atom", "cache"),
    "per_atom_recurrence": ("per_atom", "recurrence"), "positions": ("positions", "cache")}


def tie(a, d):
    """The margin below which KL_atom and KL_delete count as equal: ties (e.g. an atom X = 0
    against delete) are not wins."""
    return 1e-6 * torch.maximum(a.abs(), d.abs()) + 1e-12


def draw_text(name, args):
    """How a row's firings were drawn, for the report."""
    feats = (f"the {args.pool} features with the most firings" if args.pool_rule == "frequent"
             else f"{args.pool} features drawn among the alive (seed {args.seed})")
    return {"pool": f"{feats}, ≤ {args.pool_cap} firings (a_i(t) > 0) each (seed {args.seed}), "
                    "deduplicated, the dominant atom substituted",
            "per_atom": f"≤ {args.per_atom} firings per dominant atom, then ≤ {args.max_firings}",
            "positions": f"{args.max_firings} positions drawn uniformly among the held-out "
                         "positions where the SAE fires (position-weighted)"}[name]


def firing_draws(scans, args, gen):
    """-> ({draw: sorted (block, t) list}, {pool firing: the feature that drew it}, the pool's
    features, the number of candidates). Candidates: positions where the SAE fires and t + 1 +
    horizon is in the block (reading B reads t + 1).
      pool         firings of feature i are positions with a_i(t) > 0; the --pool features with
                   the most firings (--pool-rule frequent) or drawn among the alive (random),
                   ≤ --pool-cap firings each, deduplicated
      per_atom     ≤ --per-atom per dominant atom, then ≤ --max-firings
      positions    --max-firings drawn uniformly among the candidates"""
    T = [len(scan["codes"]) - 1 - args.horizon for scan in scans]
    where = [(b, t) for b, n in enumerate(T) for t in range(n)]
    C = torch.cat([scan["codes"][:n] for scan, n in zip(scans, T)]).cpu()         # [P,n_feat]
    fires = C.amax(-1) > 0
    counts = (C[fires] > 0).sum(0)                                                 # [n_feat]
    alive = (counts > 0).nonzero().flatten()
    if args.pool_rule == "frequent":
        feats = counts.topk(min(args.pool, len(alive))).indices
    else:
        feats = alive[torch.randperm(len(alive), generator=gen)[:args.pool]]
    pool = {}
    for i in feats.tolist():
        at = (C[:, i] > 0).nonzero().flatten()
        for j in at[torch.randperm(len(at), generator=gen)[:args.pool_cap]].tolist():
            pool.setdefault(where[j], i)
    dom, cand = C.argmax(-1), fires.nonzero().flatten()
    per_atom = []
    for i in dom[cand].unique().tolist():
        at = cand[dom[cand] == i]
        per_atom += at[torch.randperm(len(at), generator=gen)[:args.per_atom]].tolist()
    draws = {"pool": sorted(pool),
             "per_atom": sorted(where[j] for j in sample(per_atom, args.max_firings, gen)),
             "positions": sorted(where[j] for j in sample(cand.tolist(), args.max_firings, gen))}
    return draws, pool, feats.tolist(), len(cand)


def cond_kls(firings, idx, args, reading="cache", direction=0, key="kl"):
    """KL_atom, KL_delete, KL_random (at --scale) of the firings idx: one reading, one direction."""
    sfx = "_matched" if args.scale == "matched" else ""
    kl = firings[key][idx][:, READINGS.index(reading), direction]                 # [n,5]
    return tuple(kl[:, CONDS.index(c)].contiguous()
                 for c in ("atom" + sfx, "delete", "random" + sfx))


def win_stats(a, d, firings, idx, args, name):
    """Win rate (KL_atom < KL_delete) with its Wilson and cluster-bootstrap intervals (by passage,
    by dominant atom)."""
    win = (d - a) > tie(a, d)
    k, n = int(win.sum()), len(win)
    boot = lambda c: cluster_bootstrap(win.double(), c, args.boot, args.seed)  # noqa: E731
    return win, {name: k / n, f"{name}_ci": wilson(k, n),
                 f"{name}_ci_passage": boot(firings["block"][idx]),
                 f"{name}_ci_feature": boot(firings["atom"][idx])}


def population(win, atoms, args):
    """The population test (App. F.2): the mean of per-atom win rates, ≤ --per-atom firings each."""
    per = [w for w in (win[atoms == i][:args.per_atom] for i in atoms.unique())
           if len(w) >= args.min_atom_firings]
    if not per:
        return None
    p = torch.tensor([w.float().mean().item() for w in per])
    return {"atoms": len(per), "firings": sum(map(len, per)), "mean": p.mean().item(),
            "median": p.median().item(), "ci": bootstrap_ci(p, "mean", args.boot, args.seed),
            "range": [p.min().item(), p.max().item()]}


def subst_summary(firings, idx, args, reading="cache", key="kl"):
    """The statistics of one row: the firings idx (indices into firings), one reading, both
    directions."""
    a, d, r = cond_kls(firings, idx, args, reading, 0, key)
    if len(a) == 0:
        return {"n": 0}
    ar, dr, rr = cond_kls(firings, idx, args, reading, 1, key)
    win, out = win_stats(a, d, firings, idx, args, "win")
    win_rev, rev = win_stats(ar, dr, firings, idx, args, "win_rev")
    chain, n = win & ((r - d) > tie(d, r)), len(a)
    med = {c: median_mad(x) for c, x in (("atom", a), ("delete", d), ("random", r))}

    def by_quartile(x):  # win rate in each quartile of x over these firings, with the edges
        edges = torch.quantile(x.double(), torch.tensor([.25, .5, .75], dtype=F64))
        q = torch.bucketize(x.double(), edges)
        return {"edges": edges.tolist(),
                "win": [win[q == j].float().mean().item() for j in range(4)]}

    out |= rev | {
        "n": n, "chain": chain.float().mean().item(), "chain_ci": wilson(int(chain.sum()), n),
        "chain_rev": (win_rev & ((rr - dr) > tie(dr, rr))).float().mean().item(), "median": med,
        "median_rev": {c: median_mad(x)
                       for c, x in (("atom", ar), ("delete", dr), ("random", rr))},
        "ratio_of_medians": [1.0] + [med[c][0] / max(med["atom"][0], 1e-30)
                                     for c in ("delete", "random")],
        "per_firing_ratio": {c: (x / a.clamp_min(1e-30)).median().item()
                             for c, x in (("delete", d), ("random", r))},
        "sign": sign_stats(torch.where((d - a).abs() > tie(a, d), d - a, torch.zeros_like(d))),
        "by_delete_kl": by_quartile(d), "by_cos": by_quartile(firings["cos"][idx]),
        "by_norm_ratio": by_quartile(firings["norm_ratio"][idx]),
        "median_cos": firings["cos"][idx].median().item()}
    if p := population(win, firings["atom"][idx], args):
        out["population"] = p
    return out


def cached_state(site, cache):
    """The name of the site layer's state [B,H,K,V] in a Cache: its one entry of that shape."""
    layer, (K, V) = cache.layers[site.layer], site.model.state_shape
    B = next(iter(layer.values())).shape[0]
    names = [n for n, x in layer.items() if tuple(x.shape) == (B, site.model.n_heads, K, V)]
    if len(names) != 1:
        raise ValueError(f"layer {site.layer}'s cache has {len(names)} entries shaped as its state")
    return names[0]


def substitution_branches(site, blocks, points, rows_fn, n_after=0):
    """Both readings of one edit list per row at each (b, t): yields (b, t, logits_B, logits_A),
    each [n,1+n_after,vocab]. A (in-recurrence) runs token t (+ n_after) with the edits inside the
    forward: the read at t sees S'_t. B (cache edit) steps token t unedited, applies the same
    edits to the cache's S_t (apply_edits on the step's own writes) and runs token t + 1
    (+ n_after): only the state carried into t + 1 differs. One cache walks along each block."""
    by, model = {}, site.model
    for b, t in points:
        by.setdefault(b, set()).add(t)
    bar = tqdm(total=sum(map(len, by.values())), desc="substitution", leave=False)
    for b in sorted(by):
        cache, pos = None, 0
        for t in sorted(by[b]):
            rows = rows_fn(b, t)
            n = len(rows)
            edits = [dataclasses.replace(e, batch=r) for r, es in enumerate(rows) for e in es]
            with torch.no_grad():
                if t > pos:
                    cache = model(blocks[b][None, pos:t], cache=cache, use_cache=True,
                                  logits="none").cache
                rows_cache = None if cache is None else cache.repeat(n)
                la = model(blocks[b][t:t + 1 + n_after].expand(n, -1), cache=rows_cache,
                           edits=edits).logits
                step = model(blocks[b][None, t:t + 1], cache=cache, use_cache=True, logits="none",
                             capture=Capture((site.layer,)))
                cache = step.cache
                pos = t + 1
                w = {k: x[:, 0].expand(n, *x.shape[2:])                            # [n,H,..]
                     for k, x in step.captures[site.layer].items()}
                edited = cache.repeat(n)
                name = cached_state(site, cache)
                S = edited.layers[site.layer]
                S[name] = apply_edits(S[name], w, edits, model.default_write)
                lb = model(blocks[b][t + 1:t + 2 + n_after].expand(n, -1), cache=edited).logits
            yield b, t, lb, la
            bar.update()
    bar.close()


def firing_kls(site, blocks, scans, picked, gen, horizon=0):
    """The KLs between the unedited and each condition's next-token distribution at each firing
    (b, t): kl [N,2,2,5] (READINGS, both directions, CONDS) at the reading's first position, kl_h
    summed over it and `horizon` further positions."""
    def rows_fn(b, t):
        factors = substitution_factors(site.dec_k, site.dec_v, scans[b]["codes"][t],
                                       *native(site, scans[b], t), gen)
        return [[]] + [[edit(site, t, "delete" if factors[c] is None else "replace", factors[c])]
                       for c in CONDS]

    def kls(logits):  # -> [2,5,1+h]; in fp64, where a KL near 0 keeps its sign
        lp = logits.double().log_softmax(-1)                                  # [1+5,1+h,vocab]
        return torch.stack([(lp[:1].exp() * (lp[:1] - lp[1:])).sum(-1),
                            (lp[1:].exp() * (lp[1:] - lp[:1])).sum(-1)])

    firings = {k: [] for k in ("block", "t", "atom", "onset", "kl", "kl_h", "cos", "norm_ratio")}
    for b, t, lb, la in substitution_branches(site, blocks, picked, rows_fn, horizon):
        kl = torch.stack([kls(lb), kls(la)]).transpose(-1, -2).cpu()          # [2,2,1+h,5]
        codes = scans[b]["codes"]
        i = int(codes[t].argmax())
        atom = (codes[t, i] * site.dec_k[i], site.dec_v[i])
        nat = native(site, scans[b], t)
        onset = t == 0 or codes[t - 1, i].item() == 0
        norm_ratio = (frob(*atom) / frob(*nat).clamp_min(1e-30)).item()
        for k, v in zip(firings, (b, t, i, onset, kl[:, :, 0], kl.sum(2),
                                  frob_cos(*atom, *nat).item(), norm_ratio)):
            firings[k].append(v)
    return {k: torch.stack(v) if k.startswith("kl") else torch.tensor(v)
            for k, v in firings.items()}


def subst_points(firings, idx, args):
    """The primary row's per-firing KLs (the figure data contract), ≤ 5000 drawn with the seed."""
    if len(idx) > 5000:
        idx = torch.tensor(sample(idx.tolist(), 5000, seeded(args, 2)))
    row = next(iter(SUBST_ROWS))
    a, d, r = cond_kls(firings, idx, args, SUBST_ROWS[row][1])
    return {"row": row, "kl_atom": a.tolist(), "kl_delete": d.tolist(), "kl_random": r.tolist(),
            "atom": firings["atom"][idx].tolist()}


READING_TEXT = {"cache": "cache edit: S_t edited after step t, KL at t + 1",
                "recurrence": "in-recurrence: the read at t sees S'_t, KL at t"}


def exp_subst(site, blocks, scans, args):
    """KL of the three conditions at the firings of each row (SUBST_ROWS): the pool read from
    the edited cache at t + 1 is the primary; the pool's in-recurrence and onset readings, the
    per-atom-capped and the position-weighted draws are secondary. The KLs are computed once per
    distinct firing; every row carries how its firings were drawn and read."""
    gen = seeded(args, 0)
    draws, pool, feats, n_cand = firing_draws(scans, args, gen)
    if not n_cand:
        raise ValueError("the SAE never fires on the held-out blocks: no firings to substitute")
    union = sorted(set().union(*draws.values()))
    firings = firing_kls(site, blocks, scans, union, gen, args.horizon)
    row_of = {p: j for j, p in enumerate(union)}
    idx = {name: torch.tensor([row_of[p] for p in d], dtype=torch.long)
           for name, d in draws.items()}
    share = torch.cat([frob(*native(site, scan, slice(None))) / scan["S_norm"].clamp_min(1e-30)
                       for scan in scans])                                    # ‖W_nat‖ / ‖S_t‖
    decay = torch.cat([scan["w"]["decay"].flatten() for scan in scans])
    res = {"scale": args.scale, "horizon": args.horizon, "n_candidates": n_cand,
           "primary": next(iter(SUBST_ROWS)), "pool_features": feats,
           "mean_decay": decay.mean().item(), "median_write_share": share.median().item()}
    rule = "most-firing" if args.pool_rule == "frequent" else "random"
    short = {"pool": f"pool: {len(feats)} {rule} features × ≤ {args.pool_cap}",
             "per_atom": f"≤ {args.per_atom} per atom", "positions": "uniform over positions",
             "cache": "cache edit, t + 1", "recurrence": "in-recurrence, t"}
    for name, (draw, reading) in SUBST_ROWS.items():
        onset = name.endswith("onset")
        i = idx[draw][firings["onset"][idx[draw]]] if onset else idx[draw]
        res[name] = {"sampling": draw_text(draw, args) + (", onset firings only" if onset else ""),
                     "reading": READING_TEXT[reading],
                     "label": f"{short[draw]}{', onset' if onset else ''}; {short[reading]}",
                     **subst_summary(firings, i, args, reading)}
        if args.horizon:
            res[name + f"_sum_h{args.horizon}"] = subst_summary(firings, i, args, reading, "kl_h")
    a, d, _ = cond_kls(firings, idx["pool"], args)
    win = (d - a) > tie(a, d)
    by = torch.tensor([pool[union[j]] for j in idx["pool"].tolist()])
    res["pool"]["by_feature"] = {  # the win rate of the firings each pool feature drew
        i: {"n": int((by == i).sum()), "win": win[by == i].float().mean().item()}
        for i in feats if (by == i).any()}
    res["points"] = subst_points(firings, idx["pool"], args)
    return res


# ==== Experiment 2: the closed-form logit shift (§2, App. A) ====

PREDICTORS = ("eq1", "eq1+gain", "exact")  # as printed; + the norms' local gains; + exact transport
FIGURE_PREDICTORS = ("exact", "eq1+gain", "eq1")  # closed["points"]: the first one defined at h
PAPER_FIT_NOTE = (
    "App. A fits one G per (prompt, atom, token) by least squares over the ε grid. That scalar "
    "absorbs all of the prediction's variation across prompts, and R² is taken across prompts, "
    "so it tests only that Δℓ is linear in ε: any first-order effect scores near 1, whatever the "
    "formula predicts for each prompt.")


def eq1_predictions(dk, dv, w, t0, hs, W_O, W_U_tok):
    """Eq. (1) as printed, per unit ε, at t0 + h (h in hs):
    Δℓ_tok = G ⟨dec_k, q̃_t⟩ ⟨W_O dec_v, W_U[tok]⟩ with G = Π_{s=t0+1}^{t} decay_s, no head-norm
    gain and the raw W_U rows (no final norm). It reads only the writes' decay and query.
    dk [A,r,K], dv [A,r,V]; W_U_tok [A,n_tok,D].  -> [A,Hn,n_tok]"""
    key, out = dk.clone(), []
    for s in range(t0, t0 + max(hs) + 1):
        if s > t0:
            key = w["decay"][s][None, None] * key                   # G·dec_k  [A,r,K]
        if s - t0 in hs:                                            # Eq. (1)
            ones = torch.ones_like(w["gain"][s])
            out.append(logit_shift_prediction(1.0, key, w["query"][s], ones, dv, W_O, W_U_tok))
    return torch.stack(out, 1)


def paper_fit(y, pred):
    """App. A's 'empirical G': one scalar per (prompt, atom, token, h) by least squares over the
    ε axis (dim 2), G = Σ_ε y pred / Σ_ε pred², returned as G·pred. y (measured), pred
    [P,A,E,Hn,n_tok]. PAPER_FIT_NOTE says why it scores high."""
    fitted = pred * (y * pred).sum(2, keepdim=True)
    return fitted / (pred * pred).sum(2, keepdim=True).clamp_min(1e-300)


def cf_summary(c, small):
    """Summaries of a grid of R² cells c [A,E]; small [E] the cells pooled into the headline."""
    some = bool(small.any())
    nan = float("nan")
    return {"median_small": c[:, small].nanmedian().item() if some else nan,
            "median_cell": c.nanmedian().item(),
            "median_per_atom": c[:, small].nanmedian(1).values.tolist() if some else [],
            "median_by_eps": c.nanmedian(0).values.tolist(),
            "frac_cells_gt_0.95": (c[:, small] > 0.95).float().mean().item() if some else nan,
            "frac_all_cells_gt_0.95": (c > 0.95).float().mean().item()}


def cf_cells(y, preds, small, hs):
    """R² across prompts per (atom, ε) cell: each predictor with no fitted parameter and with one
    OLS slope (+ intercept) per cell, and the paper's per-triple fit of eq1.
    y, preds[name] [P,A,E,Hn,n_tok]; small [E].  -> {h: {kind: summary}}"""
    A, nE = y.shape[1:3]

    def grid(fn, p, j, k=0):  # [A,E]
        return torch.tensor([[fn(y[:, a, e, j, k], p[:, a, e, j, k]) for e in range(nE)]
                             for a in range(A)])

    fits = {k: v for name, p in preds.items()
            for k, v in ((name, (r2, p)), (name + "_ols", (ols_r2, p)))}
    fits["paper_fit"] = (r2, paper_fit(y, preds["eq1"]))
    out = {}
    for j, h in enumerate(hs):
        out[h] = {kind: cf_summary(grid(fn, p, j), small) for kind, (fn, p) in fits.items()
                  if p[..., j, 0].isfinite().all()}
        agree = y[..., j, 0].sign() == preds["eq1"][..., j, 0].sign()
        out[h].update({"sign_agreement": agree.double().mean().item(), "n_sign": agree.numel(),
                       "sign_agreement_ci": wilson(int(agree.sum()), agree.numel()),
                       "eq1+gain_ols_by_token_rank": [
                           grid(ols_r2, preds["eq1+gain"], j, k).nanmedian().item()
                           for k in range(y.shape[-1])]})
    return out


def closed_shifts(site, blocks, scans, points, dk, dv, toks, E, hs):
    """The measured Δℓ of adding ε·A_i at each (b, t0) in points, at t0 + h on each atom's tokens,
    and the PREDICTORS' Δℓ per unit ε.  dk [A,r,K], dv [A,r,V], toks [A,n_tok], E [E].
    -> measured [P,A,E,Hn,n_tok], predicted [P,3,A,Hn,n_tok]"""
    A, n_e, Hmax = len(dk), len(E), max(hs)
    eps = site.model.head_norm_eps
    meas, pred = [], []
    rows_fn = lambda b, t0: [[]] + [[edit(site, t0, "add", (e * dk[a], dv[a]))]  # noqa: E731
                                    for a in range(A) for e in E.tolist()]
    for b, t0, logits in branches(site, blocks, points, rows_fn, Hmax, "closed form"):
        d = (logits[1:] - logits[:1]).float().view(A, n_e, Hmax + 1, -1)[:, :, hs]
        meas.append(torch.stack([d[a][..., toks[a]] for a in range(A)]))  # [A,E,Hn,n_tok]
        w = scans[b]["w"]
        gain_pred, exact_pred = shift_predictions(
            site.model, dk, dv, w, t0, hs, lambda s: unembed(site, scans[b], s, toks),
            scans[b]["read"], site.W_O, eps)
        eq1_pred = eq1_predictions(dk, dv, w, t0, hs, site.W_O, site.W_U[toks])
        pred.append(torch.stack([eq1_pred, gain_pred, exact_pred]))  # [3,A,Hn,n_tok] per unit ε
    return torch.stack(meas).cpu().double(), torch.stack(pred).cpu().double()


def exp_closed(site, blocks, scans, args):
    """Add ε·A_i at t0, measure Δℓ at t0 + h on each atom's top direct-path tokens, and compare
    with the PREDICTORS across prompts per (atom, ε) cell. ε on two grids: absolute (the paper's
    units, S_t0 + ε v wᵀ with unit factors, Table 9's values; the headline) and relative (× the
    median held-out ‖S_t‖_F). All predictors leave out the layers after the site (the direct
    path)."""
    scale = torch.cat([scan["S_norm"] for scan in scans]).median().item()
    gen = seeded(args, 1)
    hs = args.cf_h
    T = blocks.shape[1]
    na = len(args.eps)
    E = torch.tensor(args.eps + [e * scale for e in args.eps_rel], dtype=F64)  # [E] absolute ε
    dom = torch.cat([scan["codes"].argmax(-1)[scan["codes"].amax(-1) > 0] for scan in scans])
    counts = torch.bincount(dom.cpu(), minlength=site.dec_k.shape[0])
    atoms = counts.topk(min(args.cf_atoms, int((counts > 0).sum()))).indices.to(site.dec_k.device)
    dk, dv = site.dec_k[atoms], site.dec_v[atoms]                   # [A,r,K], [A,r,V]
    direct = (dv.sum(1) @ site.W_O.T) @ site.W_U.T                  # [A,vocab]
    toks = direct.abs().topk(args.cf_tokens, -1).indices            # [A,n]
    Hmax = max(hs)
    if T < Hmax + 2:
        raise ValueError(f"blocks of {T} tokens are too short for a horizon of {Hmax}")
    points = sample([(b, t) for b in range(len(blocks)) for t in range(1, T - Hmax)],
                    args.cf_prompts, gen)
    y, u = closed_shifts(site, blocks, scans, points, dk, dv, toks, E, hs)
    preds = {n: u[:, j, :, None] * E[None, None, :, None, None] for j, n in enumerate(PREDICTORS)}
    small = E <= args.cf_small * scale
    if not small[:na].any():  # no absolute ε is small against this model's states: the smallest
        small[int(E[:na].argmin())] = True
    part = lambda sl: ({n: p[:, :, sl] for n, p in preds.items()}, small[sl], hs)  # noqa: E731
    res = {"atoms": atoms.tolist(), "tokens": toks.tolist(), "eps": args.eps,
           "eps_rel": args.eps_rel, "state_norm_median": scale, "prompts": len(y),
           "eps_unit": "absolute: S_t0 + ε·v wᵀ with unit-norm factors (App. A); relative: "
                       f"ε·{scale:.4g} (the median held-out ‖S_t‖_F)",
           "pooled_eps": E[:na][small[:na]].tolist(),
           "pooled_rule": f"absolute ε ≤ {args.cf_small:g}·median ‖S_t‖_F (else the smallest ε)",
           "headline_h": next((h for h in hs if h >= 1), hs[0]), "paper_fit_note": PAPER_FIT_NOTE,
           "by_h": cf_cells(y[:, :, :na], *part(slice(0, na))),
           "relative": cf_cells(y[:, :, na:], *part(slice(na, None)))}
    res["points"] = cf_points(y[:, :, :na], {n: p[:, :, :na] for n, p in preds.items()}, small[:na],
                              res["pooled_eps"], hs, gen)
    return res


def cf_points(y, preds, small, pooled_eps, hs, gen, cap=5000):
    """closed["points"]: measured vs predicted Δℓ of the rank-1 eval token at the pooled ε, pooled
    over atoms and prompts (≤ cap, subsampled with gen), for the most complete no-fit predictor
    defined at each horizon (FIGURE_PREDICTORS)."""
    pts = {}
    for j, h in enumerate(hs):
        m = y[:, :, small, j, 0].flatten()
        name = next(n for n in FIGURE_PREDICTORS
                    if preds[n][:, :, small, j, 0].isfinite().all() or n == "eq1")
        p = preds[name][:, :, small, j, 0].flatten()
        keep = torch.randperm(len(m), generator=gen)[:cap].sort().values
        pts[str(h)] = {"predictor": name, "eps": pooled_eps, "pred": p[keep].tolist(),
                       "meas": m[keep].tolist(), "r2": r2(m, p)}
    return pts


# ==== Experiment 3: cache edits (§4, App. I) ====

def random_like(k, v, gen):
    """A Gaussian rank-r matrix with the Frobenius norm of k ⊗ v, drawn from gen (CPU).
    -> factors [r,K], [r,V]"""
    rk = torch.randn(k.shape, generator=gen).to(k)
    rv = torch.randn(v.shape, generator=gen).to(v)
    return rk * frob(k, v) / frob(rk, rv).clamp_min(1e-30), rv


def halves_by_passage(blocks_of, gen):
    """Two halves of the firings by passage (firings of one passage share context, so a token
    chosen on a passage is never tested on it): passages in a random order, each to the half with
    fewer firings so far; with a single passage, alternate firings.
    blocks_of [n] -> half [n] in {0, 1}"""
    ids, cnt = blocks_of.unique(return_counts=True)
    if len(ids) < 2:
        return torch.arange(len(blocks_of)) % 2
    size, half = [0, 0], {}
    for j in torch.randperm(len(ids), generator=gen).tolist():
        g = int(size[1] < size[0])
        half[int(ids[j])] = g
        size[g] += int(cnt[j])
    return torch.tensor([half[int(b)] for b in blocks_of])


def preferred_token(base, cond, fit):
    """App. I.4's feature detection: argmax over tokens of
    Σ_{firings in fit} (log p_base − log p_cond).  base, cond [n,vocab] log-probabilities;
    fit [n] bool."""
    return int((base[fit] - cond[fit]).sum(0).argmax())


def erase_test(base, cond, half, cross_fit=True):
    """Δ log p = log p_cond − log p_base of the preferred token at each firing. cross_fit: a
    firing's token is chosen on the other half; else on all firings, the ones it is then tested
    on (in-sample: the argmax over the vocabulary of the noise it is tested on, so even a null
    edit can pass).  -> d [n], token [n]"""
    if cross_fit:
        tok = torch.tensor([preferred_token(base, cond, half != g) for g in (0, 1)])[half]
    else:
        every = torch.ones(len(base), dtype=torch.bool)
        tok = torch.full((len(base),), preferred_token(base, cond, every))
    return (cond - base).gather(1, tok[:, None])[:, 0], tok


def erase_summary(base, cond, half, args, cross_fit=True):
    """The median Δ log p of the preferred token (bootstrap CI, Wilcoxon p) and its median rank
    before and after the edit."""
    d, tok = erase_test(base, cond, half, cross_fit)

    def rank(lp):  # the median rank of the preferred token
        return (lp > lp.gather(1, tok[:, None])).sum(1).double().median().item()

    return {"n": len(d), "median": d.median().item(), "mean": d.mean().item(),
            "median_ci": bootstrap_ci(d, "median", args.boot, args.seed),
            "wilcoxon_p": sign_stats(d)["wilcoxon_p"], "tokens": tok.unique().tolist(),
            "rank_native": rank(base), "rank_patched": rank(cond)}


ERASE_ROWS = ("delete", "atom_term", "null")  # the edits at each firing, after the unedited row


def exp_erase(site, blocks, scans, args):
    """At the atom's firings t: delete the native write (App. I.4; primary), remove a_i(t)·A_i
    (secondary), or remove a random rank-r matrix of norm ‖a_i(t)·A_i‖ drawn per firing (the null
    control). Δ log p of the preferred token at t + 1 (the read after the edited write), the token
    chosen on the other half of the passages. Non-firing control: + m·a*·A_i where a_i = 0."""
    gen = seeded(args, 2)
    T = blocks.shape[1]
    i = args.erase_atom
    if i < 0:
        i = int(sum((scan["codes"] > 0).sum(0) for scan in scans).argmax())
    # [blocks,T−1]: positions with a next token to read the edit at
    ai = torch.stack([scan["codes"][:T - 1, i] for scan in scans]).cpu()
    on = sample((ai > 0).nonzero().tolist(), args.erase_n, gen)
    off = sample((ai == 0).nonzero().tolist(), args.erase_n, gen)
    if len(on) < 2:
        raise ValueError(f"atom {i} fires {len(on)} times on the held-out blocks: erasure needs 2")
    a_star = ai[ai > 0].median()                                    # a*: the median activation
    dk, dv = site.dec_k[i], site.dec_v[i]

    def rows_fn(b, t):
        rk, rv = random_like(ai[b, t] * dk, dv, gen)                # ‖·‖ = ‖a_i(t)·A_i‖
        return [[], [edit(site, t, "delete")], [edit(site, t, "add", (-ai[b, t] * dk, dv))],
                [edit(site, t, "add", (-rk, rv))]]

    lp = torch.stack([logits[:, 1].float().log_softmax(-1).cpu()    # [n,4,vocab] at t + 1
                      for _, _, logits in branches(site, blocks, on, rows_fn, 1, "erase")])
    half = halves_by_passage(torch.tensor([b for b, _ in on]), gen)
    res = {"atom": i, "a_star": a_star.item(), "n": len(on),
           "position": "t + 1 (the read after the edited write)",
           "selection": "cross-fit: a firing's preferred token is chosen on the other half of the "
                        "passages",
           **{name: erase_summary(lp[:, 0], lp[:, j], half, args)
              for j, name in enumerate(ERASE_ROWS, 1)}}
    null = res.pop("null")
    res["null_control"] = {"p": null["wilcoxon_p"], **null}
    res["in_sample"] = {name: erase_summary(lp[:, 0], lp[:, j], half, args, cross_fit=False)
                        for j, name in enumerate(ERASE_ROWS, 1)}
    pref = preferred_token(lp[:, 0], lp[:, 1], torch.ones(len(on), dtype=torch.bool))
    res.update(preferred_token=pref, preferred_text=safe_decode(site.tok, [pref]),
               control=erase_control(site, blocks, off, pref, a_star * dk, dv, args))
    e = [("delete the write", res["delete"]), ("remove a_i·A_i", res["atom_term"]),
         ("null: remove a random rank-r", res["null_control"])]
    e += [(f"non-firing + {m} a*·A_i", c) for m, c in res["control"].items()]
    res["effects"] = [{"name": n, "value": c["median"], "ci": list(c["median_ci"]), "n": c["n"],
                       "unit": "Δ log p (nats)"} for n, c in e]
    return res


def erase_control(site, blocks, off, pref, k, v, args, mult=(1.0, 2.0, 4.0)):
    """App. I.4's non-firing control: + m·a*·A_i (k ⊗ v = a*·A_i) at positions where the atom is
    silent; Δ log p at t + 1 of the token preferred on all firings (none of these positions)."""
    rows_fn = lambda b, t: [[]] + [[edit(site, t, "add", (m * k, v))] for m in mult]  # noqa: E731
    ctrl = []
    for _, _, logits in branches(site, blocks, off, rows_fn, 1, "erase control"):
        x = logits[:, 1].float().log_softmax(-1)[:, pref]
        ctrl.append((x[1:] - x[0]).cpu())
    ctrl = torch.stack(ctrl) if ctrl else torch.zeros(0, len(mult))  # [n,3]
    return {f"{m:g}x": {"n": len(ctrl), "median": ctrl[:, j].median().item(),
                        "median_ci": bootstrap_ci(ctrl[:, j], "median", args.boot, args.seed),
                        "wilcoxon_p": sign_stats(ctrl[:, j])["wilcoxon_p"]}
            for j, m in enumerate(mult) if len(ctrl)}


def fit_stats(y, pred):
    """Sign agreement (Wilson CI), Pearson r, median measured/predicted ratio, pooled R² (no fit)
    of the measured y against pred."""
    agree = int((y.sign() == pred.sign()).sum())
    return {"sign_agreement": agree / len(y), "ci": wilson(agree, len(y)),
            "pearson_r": torch.corrcoef(torch.stack([y, pred]))[0, 1].item(),
            "median_ratio": (y / pred).median().item(), "pooled_r2": r2(y, pred)}


def exp_sign(site, blocks, scans, args):
    """Write ‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at one position s: does Δℓ_T at s + 1 (the next read; primary)
    and at s (whose read already sees the edit) have the sign of Eq. (1)? Predicted by eq1 (the
    paper's rule: the sign of G⟨k̂_s, q̃⟩, as ⟨W_O v*_T, W_U[T]⟩ > 0), eq1+gain and exact."""
    gen = seeded(args, 3)
    n_tok = args.sign_targets
    T = blocks.shape[1]
    pts = sample([(b, s) for b in range(len(blocks)) for s in range(T - 1)],
                 -(-args.sign_n // n_tok), gen)
    targets = {p: torch.randint(site.W_U.shape[0], (n_tok,), generator=gen).to(site.W_U.device)
               for p in pts}
    kv = lambda b, s: install_factors(  # noqa: E731
        scans[b]["w"], s, install_direction(site.W_O, site.W_U[targets[b, s]]))
    eps = site.model.head_norm_eps

    def rows_fn(b, s):  # the base row, then one row per target: k [1,K] ⊗ v*_T [1,V]
        k, v = kv(b, s)
        return [[]] + [[edit(site, s, "add", (k, v[j:j + 1]))] for j in range(n_tok)]

    meas, pred = [], []
    for b, s, logits in branches(site, blocks, pts, rows_fn, 1, "sign test"):
        Tk = targets[b, s]
        w = scans[b]["w"]
        k, v = kv(b, s)
        lg = logits.float()                                         # [1+n_tok,2,vocab]
        hit = lg[1:].gather(-1, Tk[:, None, None].expand(-1, 2, 1))[..., 0]  # [n_tok,2]
        meas.append((hit - lg[0][:, Tk].T).cpu())
        key, val = k.expand(n_tok, 1, -1), v[:, None]               # [n_tok,1,K], [n_tok,1,V]
        gain_pred, exact_pred = shift_predictions(
            site.model, key, val, w, s, [0, 1], lambda t: unembed(site, scans[b], t, Tk)[:, None],
            scans[b]["read"], site.W_O, eps)
        eq1_pred = eq1_predictions(key, val, w, s, [0, 1], site.W_O, site.W_U[Tk][:, None])
        pred.append(torch.stack([eq1_pred, gain_pred, exact_pred])[..., 0].cpu())  # [3,n_tok,2]
    y = torch.cat(meas).double()                                    # [n,2]
    predicted = torch.cat(pred, 1).double()                         # [3,n,2]
    res = {"n": len(y), "position": "s + 1 (primary) and s",
           "targets": "uniform over the vocabulary"}
    for j, pos in enumerate(("s", "s+1")):
        res[pos] = {name: fit_stats(y[:, j], predicted[p, :, j])
                    for p, name in enumerate(PREDICTORS) if predicted[p, :, j].isfinite().all()}
    res.update(sign_agreement=res["s+1"]["eq1"]["sign_agreement"], ci=res["s+1"]["eq1"]["ci"])
    return res


# App. I.6's target classes (Table 21's order)
STRATA = ("frequent", "100-1000", "rare", "semantic")
OUT_OF_CONTEXT = 1000  # the initial rank from which a target is out of context (beyond 100–1000)


def target_masks(site, blocks):
    """Per-vocabulary masks of the rules that do not depend on the context: frequent (the 5% most
    frequent ids of the held-out blocks), rare (seen at most once there), word (a space, then ≥ 3
    letters: a whole word)."""
    n = site.W_U.shape[0]
    counts = torch.bincount(blocks.flatten().cpu(), minlength=n)
    texts = [safe_decode(site.tok, [j]) for j in range(n)]
    word = torch.tensor([s is not None and len(s) > 3 and s[0] == " " and s[1:].isalpha()
                         for s in texts])
    return {"frequent": counts >= counts.float().quantile(0.95).clamp_min(1), "rare": counts <= 1,
            "word": word, "texts": texts}


def install_targets(masks, order, prompt_text, n, gen):
    """n targets per stratum at one context; order = ids by descending unedited next-token
    probability. 100-1000: initial rank in [100, 1000); the others out of context (rank ≥
    OUT_OF_CONTEXT) and frequent, rare, or semantic (a whole word not in the prompt, case-folded).
    -> [(stratum index, id)]"""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    rank, low = rank.cpu(), (prompt_text or "").lower()
    out_ctx = rank >= OUT_OF_CONTEXT
    unseen = torch.tensor([not (s and s[1:].lower() in low) for s in masks["texts"]])
    pools = {"frequent": masks["frequent"] & out_ctx, "100-1000": (rank >= 100) & (rank < 1000),
             "rare": masks["rare"] & out_ctx, "semantic": masks["word"] & out_ctx & unseen}
    return [(j, T) for j, name in enumerate(STRATA)
            for T in sample(pools[name].nonzero().flatten().tolist(), n, gen)]


def install_edits(site, scan, P, T, m, row=None):
    """Add m·‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at the three positions before P (App. I.6), in batch row
    `row`."""
    v = install_direction(site.W_O, site.W_U[T])[None]              # [1,V]
    return [edit(site, s, "add", install_factors(scan["w"], s, v, m), batch=row)
            for s in range(P - 3, P)]


@torch.no_grad()
def install_trials(site, block, scan, P, masks, cache, args, gen):
    """The trials of one context block[:P], from cache (the prefix up to P − 3): (stratum, m,
    T in edited, T in native, first-step lift, rank shift) per target and m."""
    x3 = block[None, P - 3:P]
    lg = site.model(x3, cache=cache, logits="last").logits[0, -1].float()
    prompt = safe_decode(site.tok, block[:P].tolist())
    rows = [(j, T, m) for j, T in install_targets(masks, lg.argsort(descending=True), prompt,
                                                  args.install_targets, gen)
            for m in args.install_m]
    edits = [e for r, (j, T, m) in enumerate(rows, 1)
             for e in install_edits(site, scan, P, T, m, r)]
    x = x3.expand(len(rows) + 1, -1)
    big = cache.repeat(len(rows) + 1)
    logits = site.model(x, cache=big, edits=edits, logits="last").logits[:, -1]
    lp = logits.float().log_softmax(-1)
    cont = site.model.generate(x, args.gen_len, edits=edits, cache=big)[:, 3:]

    def above(r, T):  # the rank of T in row r
        return int((lp[r] > lp[r, T]).sum())

    return [(j, m, bool((cont[r] == T).any()), bool((cont[0] == T).any()),
             (lp[r, T] - lp[0, T]).item(), above(0, T) - above(r, T))
            for r, (j, T, m) in enumerate(rows, 1)]


@torch.no_grad()
def exp_install(site, blocks, scans, args):
    """App. I.6: at each context, add m·‖k_s v_sᵀ‖·k̂_s v*_Tᵀ at its last three positions (added to
    the state, the native write kept), then 20 greedy tokens: is T among them? Contexts:
    --install-positions per passage, their ends evenly spaced from --install-len to the block's
    end."""
    gen = seeded(args, 4)
    T = blocks.shape[1]
    out = []
    masks = target_masks(site, blocks)
    n_pos = args.install_positions
    ends = sorted({args.install_len + j * (T - args.install_len) // n_pos for j in range(n_pos)})
    if ends[0] < 4:
        raise ValueError(f"--install-len {args.install_len} leaves no room for 3 install positions")
    for b in tqdm(range(min(args.install_prompts, len(blocks))), desc="install", leave=False):
        cache, pos = None, 0
        for P in ends:  # one cache walked along the passage to each context's first install
            cache = site.model(blocks[b][None, pos:P - 3], cache=cache, use_cache=True,
                               logits="none").cache
            pos = P - 3
            out += [o + (b,) for o in install_trials(site, blocks[b], scans[b], P, masks, cache,
                                                     args, gen)]
    return install_summary(out, args, len(ends))


def install_cell(o, args):
    """One cell's rates (T in the edited / native continuation, Wilson CIs), its median first-step
    lift and rank shift, from the trials o (as install_summary lists them)."""
    hit = sum(x[2] for x in o)
    nat = sum(x[3] for x in o)
    return {"n": len(o), "edited": hit / len(o), "edited_ci": wilson(hit, len(o)),
            "native": nat / len(o), "native_ci": wilson(nat, len(o)),
            "first_step_lift": torch.tensor([x[4] for x in o]).median().item(),
            "rank_shift": torch.tensor([float(x[5]) for x in o]).median().item(),
            "rank_improved": sum(x[5] > 0 for x in o) / len(o), **prompt_level_lift(o, args)}


def install_summary(out, args, n_pos):
    """Rates per m and stratum, and pooled, from the trials (stratum, m, edited, native, lift,
    rank shift, passage); effects at the middle m (the paper's 3)."""
    res = {"prompts": len({x[6] for x in out}), "contexts_per_prompt": n_pos,
           "placement": "added to the state (the native write kept) at a context's last 3 "
                        "positions",
           "strata": f"100-1000 by initial rank; frequent / rare / semantic: out of context "
                     f"(rank ≥ {OUT_OF_CONTEXT}) and the 5% most frequent ids of the held-out "
                     "blocks / ids seen there ≤ once / whole words not in the prompt",
           "by_m": {}}
    for m in args.install_m:
        res["by_m"][f"{m:g}"] = {name: install_cell(o, args) for j, name in
                                 list(enumerate(STRATA)) + [(None, "pooled")]
                                 if (o := [x for x in out if x[1] == m and j in (None, x[0])])}
    m = f"{args.install_m[len(args.install_m) // 2]:g}"
    cells = res["by_m"].get(m, {})
    res["effects"] = [{"name": f"{name}, m = {m}: {k}", "value": c[k], "ci": list(c[k + "_ci"]),
                       "n": c["n"], "unit": "fraction of trials with T in the continuation"}
                      for name in ("100-1000", "pooled") if (c := cells.get(name))
                      for k in ("edited", "native")]
    if c := cells.get("pooled"):
        res["effects"].append({"name": f"pooled, m = {m}: first-step lift (mean over prompts)",
                               "value": c["lift_prompt_mean"], "ci": list(c["lift_prompt_ci"]),
                               "n": c["lift_prompts"], "unit": "nats"})
    return res


def prompt_level_lift(o, args):
    """A prompt's targets share its context, so the lift is tested across prompts: each prompt's
    mean lift, their mean with a bootstrap CI and the Wilcoxon p (the trials of one prompt are not
    independent)."""
    by = {}
    for x in o:
        by.setdefault(x[6], []).append(x[4])
    d = torch.tensor([sum(v) / len(v) for v in by.values()], dtype=torch.float64)
    return {"lift_prompts": len(d), "lift_prompt_mean": d.mean().item(),
            "lift_wilcoxon_p": sign_stats(d)["wilcoxon_p"],
            "lift_prompt_ci": bootstrap_ci(d, "mean", args.boot, args.seed)}


def safe_decode(tok, ids):
    """The text of ids, or None for a checkpoint without a tokenizer."""
    try:
        return tok.decode(list(ids))
    except Exception:  # a checkpoint without a tokenizer: ids only
        return None


def text_stats(s):
    """Newline characters, paragraphs (blank-line separated, + 1), mean word length of a text."""
    words = s.split()
    return s.count("\n"), s.count("\n\n") + 1, sum(map(len, words)) / max(len(words), 1)


@torch.no_grad()
def amplified_texts(site, prompts, conditions, push, args):
    """Sample --amp-len tokens after each prompt under each condition (name, features, dose): add
    dose·Σ_f push_f·A_f at every decoded position. -> {name: [prompts,3] text_stats}"""
    P = args.amp_prompt_len
    stats = {}
    for name, feats, dose in tqdm(conditions, desc="amplify", leave=False):
        edits = []
        if dose:
            p = dose * push[name.split()[0]][feats].to(site.dec_k)
            kv = ((p[:, None, None] * site.dec_k[feats]).flatten(0, 1),  # Σ_f push_f A_f as
                  site.dec_v[feats].flatten(0, 1))                       # [F·r] factors
            edits = [edit(site, s, "add", kv) for s in range(P, P + args.amp_len)]
        out = site.model.generate(prompts, args.amp_len, temperature=args.amp_temperature,
                                  edits=edits, seed=args.seed)
        stats[name] = torch.tensor([text_stats(safe_decode(site.tok, o[P:].tolist()))
                                    for o in out.cpu()], dtype=F64)        # [prompts,3]
    return stats


@torch.no_grad()
def exp_amplify(site, blocks, scans, args):
    """§4's crossed design: rank features by mean activation at sentence boundaries (the next token
    is --amp-select, '.') minus elsewhere (means over all positions, zeros included), add
    dose·push_f·A_f for the top ones (push = the mean boundary activation) at every decoded
    position, and count newline characters in the decoded continuations. Control: random alive
    features at the largest dose (push = their mean activation)."""
    gen = seeded(args, 5)
    texts = [safe_decode(site.tok, [i]) for i in range(site.W_U.shape[0])]
    if texts[0] is None:
        raise ValueError("--exp amplify needs a tokenizer (the checkpoint has no tokenizer.json)")
    sel = torch.tensor([s.strip() == args.amp_select for s in texts])  # [vocab] boundary tokens
    codes = torch.cat([scan["codes"][:-1] for scan in scans]).cpu()    # [N,n]
    nxt = sel[torch.cat([b[1:] for b in blocks.cpu()])]             # the next token is a boundary
    if nxt.sum() == 0:
        raise ValueError(f"no {args.amp_select!r} token in the held-out blocks: pick another "
                         "--amp-select")
    diff = codes[nxt].mean(0) - codes[~nxt].mean(0)
    top = diff.topk(args.amp_features).indices
    alive = [i for i in (codes > 0).any(0).nonzero().flatten().tolist()
             if i not in set(top.tolist())]
    rnd = torch.tensor(sample(alive, args.amp_features, gen), dtype=torch.long)
    dmax = max(args.amp_doses)
    push = {"amplify": codes[nxt].mean(0), "random": codes.mean(0)}
    x = blocks[:args.amp_prompts, :args.amp_prompt_len]
    conditions = ([("baseline", top, 0.0)] + [(f"amplify {d:g}x", top, d) for d in args.amp_doses]
                  + [(f"random {dmax:g}x", rnd, dmax)])
    stats = amplified_texts(site, x, conditions, push, args)
    base = stats.pop("baseline")
    res = {"select": args.amp_select, "count": "newline characters in the decoded continuation",
           "features": top.tolist(), "random_features": rnd.tolist(), "diff": diff[top].tolist(),
           "prompts": len(x), "tokens": args.amp_len, "baseline_mean": base[:, 0].mean().item(),
           "conditions": {n: paired_summary(base[:, 0], c[:, 0], args.boot, args.seed)
                          for n, c in stats.items()},
           "surface": {n: {"paragraphs": c[:, 1].mean().item(),
                           "word_length": c[:, 2].mean().item()}
                       for n, c in [("baseline", base)] + list(stats.items())}}
    res["effects"] = [{"name": n, "value": c["diff"], "ci": list(c["ci"]), "n": len(x),
                       "unit": f"Δ newlines per {args.amp_len} tokens"}
                      for n, c in res["conditions"].items()]
    return res


# ==== Experiment 4: the register / bundle partition (§3.1) ====

def partition_of(site, scans, kind, args):
    """Per-atom median signed cosine to the native write `kind` over its firings (inc: the
    increment k̂ δᵀ; add: the additive write); EM mixtures with 1 and 2 components."""
    cos, ids = zip(*[atom_write_cosines(site.dec_k, site.dec_v, scan["codes"],
                                        scan["w"][f"{kind}_k"], scan["w"][f"{kind}_v"])
                     for scan in scans])
    cos = torch.cat(cos).cpu().double()
    ids = torch.cat(ids).cpu()
    order = ids.argsort(stable=True)
    atoms, n_fire = ids[order].unique_consecutive(return_counts=True)
    med = torch.stack([g.median() for g in cos[order].split(n_fire.tolist())]) if len(ids) else cos
    keep = n_fire >= args.min_fire
    med, atoms = med[keep], atoms[keep]
    res = {"alive": len(med), "dead_or_rare": site.dec_k.shape[0] - len(med),
           "min_firings": args.min_fire, "tau": args.tau, "above_tau": int((med >= args.tau).sum()),
           "below_tau": int((med < args.tau).sum()),
           "median_cos": med.median().item() if len(med) else float("nan"),
           "points": {"median_cos": med.tolist(), "atoms": atoms.tolist(), "tau": args.tau}}
    if len(med) >= 3:
        fits = {k: gmm_em(med, k, seed=args.seed) for k in (1, 2)}
        mu, var, pi, _, _ = fits[2]
        threshold = crossing(mu, var, pi)
        reg = med >= threshold          # where the higher-mean component takes over to the right
        res.update({"delta_bic": fits[2][4] - fits[1][4], "bic": {k: f[4] for k, f in fits.items()},
                    "means": mu, "vars": var, "weights": pi, "threshold": threshold,
                    "registers": int(reg.sum()), "bundles": int((~reg).sum()),
                    "register_atoms": atoms[reg].tolist(),
                    **{f"{n}_median_cos": med[s].median().item() if s.any() else float("nan")
                       for n, s in (("register", reg), ("bundle", ~reg))}})
        res["points"].update({k: res[k] for k in ("means", "vars", "weights", "threshold")})
    return res


def exp_partition(site, blocks, scans, args):
    """The partition on the cosine to the increment k̂ δᵀ (what the released code measures), and
    the same on the additive write (secondary)."""
    res = partition_of(site, scans, "inc", args)
    res["native"] = "the increment S_t − decay_t ⊙ S_{t−1}"
    res["additive"] = partition_of(site, scans, "add", args)
    res["additive"].pop("points")
    return res


# ==== Atom cards (report.html) ====

def exp_atoms(site, blocks, scans, args):
    """The data of report.html's cards for the --cards atoms that fire most (report_html.py)."""
    return report_html.atom_cards(site, blocks, scans, args,
                                  lambda scan: native(site, scan, slice(None)),
                                  lambda ids: safe_decode(site.tok, ids))


# ==== Report ====

DEVIATIONS = [
    "Substitution: the pool's features follow a stated rule (--pool-rule: the most firings, or a "
    "seeded draw), not the paper's hand-listed ones; the 'by feature' cluster bootstrap clusters "
    "on the dominant atom.",
    "Substitution: the headline win uses KL(p_base ‖ p_cond) (the released code); the paper's text "
    "says KL(p_patched ‖ p_base), reported beside it.",
    "The random condition is Gaussian rank-r at the atom term's norm (coef) or ‖W_nat‖ "
    "(matched), drawn per firing.",
    "Model and scale: the paper measures Qwen3.5-0.8B L9 H4 (and 4B/27B, Mamba-2-370M, "
    "RWKV-7-1.5B, DeltaNet, GLA); this report is of the model in Setup (the demo models have a few "
    "million parameters).",
    "Data: the paper trains on 5,000 OpenWebText passages × 1,024 tokens and evaluates on disjoint "
    "OWT text; here the run's corpus and its held-out blocks (Setup), at the run's block length.",
    "Dictionary: the paper's 2,048 atoms, k = 32, seed 42; here the run's n_feat, k and seed.",
    "The paper's Mamba-2 'diagonal decoder atom' (§3.3) is not defined; here every architecture's "
    "atoms are rank-r outer products (rank 1 for Mamba-2, whose write is rank 1).",
    "Closed form: 50 atoms × 500 prompts in the paper; here the --cf-atoms most frequent dominant "
    "atoms × --cf-prompts (b, t0), eval tokens each atom's top tokens by |W_U W_O Σ_r dec_v|; only "
    "the absolute ε ≤ --cf-small·median ‖S_t‖_F are pooled into the headline. eq1+gain and exact "
    "carry W_U[tok] back through the final norm's local Jacobian (Eq. 1 has no final norm); all "
    "leave out the layers after the site. The paper's 0.98 is its App. A fit (paper_fit), one G "
    "per prompt, which a first-order effect cannot fail (closed → paper_fit_note).",
    "Erasure: the paper's F412 at 150 firings; here --erase-atom (default: the atom that fires "
    "most) at ≤ --erase-n firings. The paper chooses the preferred token on the firings it tests "
    "(in-sample, which a null edit can pass: erase → in_sample); here on the other half of the "
    "passages. Δ log p at t + 1.",
    "Sign test: the key side is the native key k̂_s (the paper does not say) at size ‖k_s v_sᵀ‖ "
    "(no β), added to the state; targets uniform over the vocabulary.",
    "Install: 30 prompts × 5 positions × 8 targets in the paper; here --install-prompts passages × "
    "--install-positions contexts × --install-targets per stratum, added at each context's last "
    "three positions (the paper says neither add or replace, nor where). Out of context is rank ≥ "
    "1000 (the paper's ≈ 10,000–17,000 of 248k ids); the strata's rules are in install → strata.",
    "Amplification: the paper amplifies all 32 heads of Qwen3.5-4B-Base L9, 40 chat-formatted "
    "prompts × 400 tokens; here one head, --amp-prompts held-out prompts × --amp-len tokens. "
    "Features ranked by mean activation before '.' minus elsewhere, positive differences only "
    "(the paper's text; its code ranks |diff| with signed pushes); one sampling seed for all "
    "conditions; no 1× dose.",
    "Partition: the paper's GMM is sklearn's; here our own 1-D EM (5 starts); atoms with "
    "< --min-fire firings count as dead. Wilcoxon and sign tests use normal approximations.",
]
# The paper's figures for its main model, Qwen3.5-0.8B (§3–§4, App. A, F.2, I); a model class's
# PAPER_FIGURES holds, under the same keys, the ones the paper reports apart for its architecture.
PAPER = {
    "win": "92.4% [91.6, 93.1] (4,851 firings, Qwen3.5-0.8B L1/L9/L17 H4)",
    "chain": "89.5% (4,851)",
    "ratio": "1 : 2.70 : 4.90 (4,851)",
    "population": "89.8% [88.1, 91.3] (87 atoms, 2,426 firings)",
    "closed": "0.98; all > 0.95 (50 atoms × 4 ε)",
    "closed sign": "100%, 0 flips (10,000)",
    "erase": "−0.116 [−0.265, −0.042] (150 firings)",
    "erase control": "+0.016, p = 0.15 (150)",
    "sign": "84.6% [83.0, 86.2] (2,000)",
    "install 100-1000": "33.3% → 100% (300)",
    "install pooled": "8.3% → 25.0% (1,200)",
    "install lift": "+1.27 nats (1,200)",
    "amplify 5x": "16.8 → 11.2, p = 0.001 (40 × 400 tokens)",
    "random 10x": "16.8 → 19.0",
    "bic": "−296 (316 alive)",
    "partition": "222 / 94",
    "register cos": "0.262 (L9 H4)",
}


def fmt(x, pct=False):
    """A number (or a fraction as a percentage) for the report; – for none or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


def pct(x):
    """A fraction as a percentage."""
    return fmt(x, True)


def ci_text(c, as_pct=True):
    """An interval (lo, hi) as [lo, hi]."""
    return f"[{fmt(c[0], as_pct)}, {fmt(c[1], as_pct)}]"


CF_LABELS = {"paper_fit": "the paper's App. A fit: G per prompt, atom, token (see paper_fit_note)",
             "eq1": "Eq. (1) as printed, no fit", "eq1_ols": "eq1, one slope per cell",
             "eq1+gain": "eq1 with the norm gains, no fit",
             "eq1+gain_ols": "eq1 with the norm gains, one slope per cell",
             "exact": "exact transport and norm Jacobians, no fit",
             "exact_ols": "exact, one slope per cell"}


def closed_rows(r, paper):
    """The closed form's rows: each predictor at the headline h over the pooled absolute ε, the
    relative grid's smallest ε (secondary), and the sign agreement of eq1."""
    h = r["headline_h"]
    c = r["by_h"][h]
    eps = ", ".join(f"{e:g}" for e in r["pooled_eps"])
    rows = [(f"closed-form R² ({lbl}), h = {h}, ε = {eps}: median cell; cells > 0.95",
             f"{fmt(c[k]['median_small'])}; {pct(c[k]['frac_cells_gt_0.95'])}",
             len(r["atoms"]) * len(r["pooled_eps"]), "", paper("closed"))
            for k, lbl in CF_LABELS.items() if k in c]
    if k := next((k for k in ("exact", "eq1+gain") if k in r["relative"][h]), None):
        rows.append((f"closed-form R² ({CF_LABELS[k]}), h = {h}, relative ε = "
                     f"{r['eps_rel'][0]:g}·‖S‖, secondary",
                     fmt(r["relative"][h][k]["median_by_eps"][0]), len(r["atoms"]), "", ""))
    rows.append((f"closed-form sign agreement (eq1, h = {h})", pct(c["sign_agreement"]),
                 c["n_sign"], ci_text(c["sign_agreement_ci"]), paper("closed sign")))
    return rows


def subst_rows(s, name, primary, paper):
    """One substitution row's headline lines: the win rate in both KL directions with the Wilson
    and cluster-bootstrap intervals of KL(base ‖ cond)'s; for the primary also the strict chain,
    the KL medians and the win by cosine quartile; for the per-atom draw the population test."""
    label = f"{s['label']}{'' if primary else '; secondary'}"
    cis = (f"{ci_text(s['win_ci'])} Wilson; {ci_text(s['win_ci_passage'])} by passage; "
           f"{ci_text(s['win_ci_feature'])} by feature")
    rows = [(f"substitution win ({label}): KL(base ‖ cond); KL(cond ‖ base)",
             f"{pct(s['win'])}; {pct(s['win_rev'])}", s["n"], cis,
             paper("win") if primary else "")]
    if primary:
        ratio = " : ".join(f"{r:.2f}" for r in s["ratio_of_medians"])
        rows += [(f"strict chain ({label})", pct(s["chain"]), s["n"], ci_text(s["chain_ci"]),
                  paper("chain")),
                 (f"median KL atom : delete : random ({label})", ratio, s["n"], "",
                  paper("ratio")),
                 (f"win by quartile of cos(atom term, W_nat) ({label})",
                  " / ".join(map(pct, s["by_cos"]["win"])), s["n"], "", "")]
    if (p := s.get("population")) and name == "per_atom":
        rows.append((f"population test: mean per-atom win ({label})", pct(p["mean"]),
                     f"{p['atoms']} atoms", ci_text(p["ci"]), paper("population")))
    return rows


def erase_rows(e, paper):
    """Erasure's rows: the three edits cross-fit, the null control in-sample, the 4× control."""
    rows = []
    for key, lbl in (("delete", "delete the write (I.4)"), ("atom_term", "remove a_i·A_i"),
                     ("null_control", "null control: remove a random rank-r")):
        x = e[key]
        rows.append((f"erasure, {lbl}: median Δ log p of the preferred token at t + 1, "
                     "cross-fit (Wilcoxon p)", f"{x['median']:+.3g} (p = {x['wilcoxon_p']:.2g})",
                     x["n"], ci_text(x["median_ci"], False),
                     paper("erase") if key == "delete" else ""))
    x = e["in_sample"]["null"]
    rows.append(("erasure null control with the token chosen in-sample (the paper's selection)",
                 f"{x['median']:+.3g} (p = {x['wilcoxon_p']:.2g})", x["n"], "", ""))
    if c4 := e["control"].get("4x"):
        rows.append(("non-firing control 4×: median Δ log p",
                     f"{c4['median']:+.3g} (p = {c4['wilcoxon_p']:.2g})", c4["n"], "",
                     paper("erase control")))
    return rows


def sign_rows(s, paper):
    """The sign test's rows: eq1's sign agreement at s + 1 (primary) and s."""
    rows = []
    for pos in ("s+1", "s"):
        if x := s[pos].get("eq1"):
            rows.append((f"single-position sign test, Δℓ at {pos} (eq1)"
                         + ("" if pos == "s+1" else ", secondary"), pct(x["sign_agreement"]),
                         s["n"], ci_text(x["ci"]), paper("sign") if pos == "s+1" else ""))
    return rows


def install_rows(by_m, paper):
    """The install's rows per m: native → edited for 100-1000 and pooled, the first-step lift."""
    rows = []
    for m, cells in by_m.items():
        rows += [(f"install m = {m} ({key}): native → edited",
                  f"{pct(c['native'])} → {pct(c['edited'])}", c["n"], ci_text(c["edited_ci"]),
                  paper(f"install {key}") if m == "3" else "")
                 for key, c in cells.items() if key in ("100-1000", "pooled")]
        if c := cells.get("pooled"):
            rows.append((f"install m = {m}: first-step log-p lift: median; mean over prompts (p)",
                         f"{c['first_step_lift']:+.3g}; {c['lift_prompt_mean']:+.3g} "
                         f"(p = {c['lift_wilcoxon_p']:.2g})",
                         f"{c['n']} ({c['lift_prompts']} prompts)",
                         ci_text(c["lift_prompt_ci"], False),
                         paper("install lift") if m == "3" else ""))
    return rows


def amplify_rows(a, paper):
    """Amplification's rows: newlines per continuation, baseline → each condition."""
    return [(f"newlines per {a['tokens']} tokens (features selected on {a['select']!r}), "
             f"{name}", f"{c['mean_base']:.3g} → {c['mean']:.3g} (p = {c['perm_p']:.2g}, "
             f"d = {c['cohen_d']:.2f})", a["prompts"], ci_text(c["ci"], False), paper(name))
            for name, c in a["conditions"].items()]


def partition_rows(p, paper):
    """The partition's rows on the increment (beside the paper's) and on the additive write."""
    rows = []
    for name, q in (("the increment k̂ δᵀ", p), ("the additive write, secondary", p["additive"])):
        ref = paper if q is p else lambda key: ""  # noqa: E731  (the paper's beside the primary)
        if "delta_bic" in q:
            rows += [(f"partition ΔBIC, 2 vs 1 component (cos to {name})",
                      f"{q['delta_bic']:.3g}", q["alive"], "", ref("bic")),
                     (f"registers / bundles (GMM; {name})", f"{q['registers']} / {q['bundles']}",
                      q["alive"], "", ref("partition")),
                     (f"register median cosine ({name})", fmt(q["register_median_cos"]),
                      q["registers"], "", ref("register cos"))]
        rows.append((f"atoms with median cos ≥ τ = {q['tau']} ({name})",
                     f"{q['above_tau']} / {q['alive']}", q["alive"], "", ""))
    return rows


def headline(res, paper_figures=None):
    """Rows (quantity, ours, n, 95% CI, the paper's value and n): the paper's from PAPER, or from
    paper_figures (the model's PAPER_FIGURES) where the paper reports its architecture apart."""
    figures = paper_figures or {}

    def paper(key):
        return figures.get(key, PAPER.get(key, ""))

    rows = []
    if s := res.get("subst"):
        rows.append(("head memory: mean decay; median ‖W_nat‖ / ‖S_t‖",
                     f"{s['mean_decay']:.3g}; {s['median_write_share']:.3g}", "", "", ""))
        for name in SUBST_ROWS:
            if (row := s.get(name, {})).get("n"):
                rows += subst_rows(row, name, name == s["primary"], paper)
    if r := res.get("closed"):
        rows += closed_rows(r, paper)
    if e := res.get("erase"):
        rows += erase_rows(e, paper)
    if s := res.get("sign"):
        rows += sign_rows(s, paper)
    rows += install_rows(res.get("install", {}).get("by_m", {}), paper)
    if a := res.get("amplify"):
        rows += amplify_rows(a, paper)
    if p := res.get("partition"):
        rows += partition_rows(p, paper)
    return rows


def write_report(out, res, meta, read_path="", paper_figures=None):
    """report.json and report.md from the results so far (each written beside, then renamed into
    place); an experiment that failed ({"error": ...}) is listed under the table. paper_figures:
    the model's PAPER_FIGURES (see headline)."""
    def write(name, text):
        atomic_write(out / name, lambda tmp: tmp.write_text(text))

    out.mkdir(parents=True, exist_ok=True)
    write("report.json", json.dumps({"meta": meta, **res}, indent=1, default=float) + "\n")
    ok = {k: r for k, r in res.items() if "error" not in r}
    lines = [f"# WriteSAE evaluation: {meta['model']} layer {meta['layer']} head {meta['head']}",
             "", "| quantity | ours | n | 95% CI | paper (n) |", "|---|---|---|---|---|"]
    lines += [f"| {q} | {v} | {n} | {c} | {p} |" for q, v, n, c, p in headline(ok, paper_figures)]
    if failed := [f"- {k}: {r['error']}" for k, r in res.items() if "error" in r]:
        lines += ["", "Failed experiments:", ""] + failed
    lines += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Read path and closed form for this architecture", "", read_path, "",
              "## Deviations from the paper's protocol", ""] + [f"- {d}" for d in DEVIATIONS]
    for name, r in res.items():  # the per-point lists (figures, cards) stay in report.json
        r = {k: v for k, v in r.items() if k != "points"} if name != "atoms" else "in report.json"
        lines += ["", f"## {name}", "", "```json", json.dumps(r, indent=1, default=float), "```"]
    write("report.md", "\n".join(lines) + "\n")
    report_html.write(out)


# ==== Command line ====

EXPERIMENTS = {"subst": exp_subst, "closed": exp_closed, "erase": exp_erase, "sign": exp_sign,
               "install": exp_install, "amplify": exp_amplify, "partition": exp_partition,
               "atoms": exp_atoms}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def comma_list(cast):
    """An argparse type= for a comma-separated list, each item read by cast."""
    return lambda s: [cast(x) for x in s.split(",")]


def add_run_flags(p):
    # ---- run, site, output ----
    g = p.add_argument_group("run, site, output")
    g.add_argument("--run", default=None,
                   help="train.py run directory (default: train.py's default --out for --model)")
    g.add_argument("--exp", type=str, default=",".join(EXPERIMENTS),
                   help=f"comma list of {', '.join(EXPERIMENTS)}")
    g.add_argument("--model", default=None, help="the model of train.py's default run, or with "
                   "--run: override its model (same site)")
    g.add_argument("--layer", type=natural, default=None,
                   help="without --run: the layer of train.py's default run for --model "
                        "(default: its default site)")
    g.add_argument("--head", type=natural, default=None,
                   help="which of the run's heads (default its first); without --run, also picks "
                        "train.py's default run of that one head")
    g.add_argument("--sae", type=str, default="best", help="the run's SAE directory: best or last")
    g.add_argument("--tokenizer", default=None,
                   help="as train.py --tokenizer (default: the run's)")
    g.add_argument("--revision", default=None, help="as train.py --revision (default: the run's)")
    g.add_argument("--max-blocks", type=count, default=64, help="held-out blocks scanned")
    g.add_argument("--device", type=str, default=DEVICE)
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="float32 only (others refused, with the reason)")
    g.add_argument("--seed", type=int, default=2026,
                   help="the paper's substitution / Experiment C seed")
    g.add_argument("--boot", type=count, default=5000, help="bootstrap resamples")
    g.add_argument("--out", default=None, help="report directory (default <run>/eval)")


def add_subst_flags(p):
    # ---- 1. substitution ----
    g = p.add_argument_group("1. substitution (§3.2)")
    g.add_argument("--pool", type=count, default=8,
                   help="features in the firing pool (the primary row, the paper's §3.2)")
    g.add_argument("--pool-cap", type=count, default=300, help="firings per pool feature")
    g.add_argument("--pool-rule", choices=("frequent", "random"), default="frequent",
                   help="pool features: the most firings, or drawn among alive")
    g.add_argument("--max-firings", type=count, default=1000,
                   help="firings of the per-atom and the position-weighted rows")
    g.add_argument("--per-atom", type=count, default=30,
                   help="firings per dominant atom (the per-atom row and the population test cap)")
    g.add_argument("--min-atom-firings", type=count, default=5,
                   help="population test: atoms with at least this many")
    g.add_argument("--scale", choices=("coef", "matched"), default="coef",
                   help="headline atom/random scale")
    g.add_argument("--horizon", type=natural, default=0,
                   help="also sum KL over this many further positions")


def add_closed_flags(p):
    # ---- 2. closed form ----
    g = p.add_argument_group("2. closed form (§2, App. A)")
    g.add_argument("--cf-atoms", type=count, default=8, help="the most frequent dominant atoms")
    g.add_argument("--cf-prompts", type=count, default=64)
    g.add_argument("--eps", type=comma_list(float), default=[0.25, 0.5, 0.75, 1.0],
                   help="absolute ε (Table 9's grid): S_t0 + ε·A_i, unit factors; the headline")
    g.add_argument("--eps-rel", type=comma_list(float), default=[0.1, 0.3, 1.0, 3.0],
                   help="relative ε: × the median held-out ‖S_t‖_F (secondary)")
    g.add_argument("--cf-small", type=float, default=0.25,
                   help="headline pools the ε ≤ this × median ‖S_t‖_F")
    g.add_argument("--cf-h", type=comma_list(natural), default=[0, 1, 4, 16],
                   help="horizons; the headline is the first h ≥ 1")
    g.add_argument("--cf-tokens", type=count, default=5,
                   help="eval tokens per atom (rank 1 is the headline)")


def add_cache_edit_flags(p):
    # ---- 3. cache edits: erasure, sign test, install, amplification ----
    g = p.add_argument_group("3. cache edits (§4, App. I)")
    g.add_argument("--erase-atom", type=int, default=-1, help="default: the atom that fires most")
    g.add_argument("--erase-n", type=count, default=150)
    g.add_argument("--sign-n", type=count, default=2000)
    g.add_argument("--sign-targets", type=count, default=8,
                   help="random target tokens per context")
    g.add_argument("--install-prompts", type=count, default=30)
    g.add_argument("--install-len", type=count, default=32,
                   help="the shortest context (the install uses a context's last 3 positions)")
    g.add_argument("--install-positions", type=count, default=5,
                   help="contexts per passage, ends evenly spaced from --install-len")
    g.add_argument("--install-targets", type=count, default=2,
                   help="targets per stratum and context")
    g.add_argument("--install-m", type=comma_list(float), default=[1.5, 3.0, 6.0])
    g.add_argument("--gen-len", type=count, default=20)
    g.add_argument("--amp-select", type=str, default=".",
                   help="features are ranked before this token (its stripped text)")
    g.add_argument("--amp-features", type=count, default=10)
    g.add_argument("--amp-doses", type=comma_list(float), default=[2.0, 5.0, 10.0])
    g.add_argument("--amp-prompts", type=count, default=20)
    g.add_argument("--amp-prompt-len", type=count, default=32)
    g.add_argument("--amp-len", type=count, default=100)
    g.add_argument("--amp-temperature", type=float, default=0.7)


def add_partition_flags(p):
    # ---- 4. partition ----
    g = p.add_argument_group("4. partition (§3.1)")
    g.add_argument("--tau", type=float, default=0.05)
    g.add_argument("--min-fire", type=count, default=1,
                   help="firings for an atom to count as alive")
    # ---- atom cards ----
    g = p.add_argument_group("atom cards (report.html)")
    g.add_argument("--cards", type=count, default=32,
                   help="atom cards in report.html (the atoms that fire most)")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p)
    add_subst_flags(p)
    add_closed_flags(p)
    add_cache_edit_flags(p)
    add_partition_flags(p)
    args = p.parse_args(argv)
    args.exp = [e for e in args.exp.split(",") if e]
    if not args.exp:
        p.error("argument --exp: no experiment named")
    if bad := [e for e in args.exp if e not in EXPERIMENTS]:
        p.error(f"argument --exp: unknown experiment {bad[0]!r}; choose from "
                f"{', '.join(EXPERIMENTS)}")
    return args


def evaluate(site, blocks, args, done=None):
    """Scan the blocks once, run the chosen experiments; returns {experiment: results}. done(results
    so far) is called as each finishes; one that raises is {"error": "<one line>"}; the rest run."""
    torch.manual_seed(args.seed)
    blocks, res = blocks.long().to(site.W_U.device), {}
    with torch.no_grad():
        scans = [scan_block(site, b) for b in tqdm(blocks, desc="scan", leave=False)]
        for name in args.exp:
            try:
                res[name] = EXPERIMENTS[name](site, blocks, scans, args)
            except Exception as e:  # noqa: BLE001  (one failure must not take the others with it)
                tqdm.write(traceback.format_exc(), file=sys.stderr)
                res[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            if done:
                done(res)
    return res


def check_report(out, meta):
    """A report in out is only replaced by an evaluation of the same run, model, layer and head."""
    if not (out / "report.json").exists():
        return
    old = read_json(out / "report.json").get("meta", {})

    def key(m):  # the run as an absolute path (reports before meta["run"] have args.run only)
        run = m.get("run") or m.get("args", {}).get("run", "")
        return (str(Path(run).resolve()), *(m.get(k) for k in ("model", "layer", "head")))

    if key(old) != key(meta):
        raise ValueError(f"{out / 'report.json'} reports another evaluation ({old.get('model')} "
                         f"layer {old.get('layer')} head {old.get('head')} of {key(old)[0]}): give "
                         f"another --out")


PRECISION = ("the experiments compare logits of edited and unedited runs (KL, Δℓ), differences "
             "far below bf16/fp16 resolution: run eval.py in float32 (--dtype is for train.py)")


def default_run(args, dtype):
    """train.py's default run for --model at --layer/--head (or its default site): sets args.run;
    returns the loaded (model, tokenizer)."""
    import train
    targs = train.parse_args([] if args.model is None else ["--model", args.model])
    loaded = load_model(targs.model, device=args.device, dtype=dtype, revision=args.revision,
                        tokenizer=args.tokenizer)
    layer, head = train.default_site(targs.model, loaded[0])
    layer = layer if args.layer is None else args.layer
    head = head if args.head is None else args.head
    args.run = train.default_out(targs.model, layer, [head], loaded[0].n_heads)
    return loaded


def run_config(run):
    """The config.json of a train.py run directory."""
    if not (run / "config.json").exists():
        raise ValueError(f"{run} is not a train.py run directory (no config.json): train one with "
                         f"train.py first, or name its directory with --run")
    cfg = read_json(run / "config.json")
    if not {"args", "site"} <= cfg.keys():
        raise ValueError(f"{run} is not a train.py run directory (its config.json is not a run's)")
    return cfg


def load_site(args, run, cfg, loaded, dtype):
    """The site of the run's SAE for --head on --model (default: the run's model, revision and
    tokenizer; loaded is reused when it is that model). -> (site, the model's name)"""
    site_cfg, trained_on = cfg["site"], cfg["args"]["model"]
    model_name = trained_on if args.model is None else args.model
    rev = args.revision or cfg["args"].get("revision")  # the run's, unless given
    tokenizer = args.tokenizer or cfg["args"].get("tokenizer")
    if (loaded is None or model_name != trained_on
            or (rev, tokenizer) != (args.revision, args.tokenizer)):
        loaded = load_model(model_name, device=args.device, dtype=dtype, revision=rev,
                            tokenizer=tokenizer)
    model, tok = loaded
    if model.arch != site_cfg["arch"]:
        raise ValueError(f"--model {model_name} is a {model.arch} model; {run} was trained on "
                         f"{trained_on}, a {site_cfg['arch']} model")
    if model_name != trained_on:
        print(f"eval.py: warning: {run} was trained on {trained_on}, not {model_name}",
              file=sys.stderr)
    heads = site_cfg["heads"]
    head = heads[0] if args.head is None else args.head
    if head not in heads:
        raise ValueError(f"head {head} has no SAE in {run}: its heads are {heads}")
    if not (run / args.sae).is_dir():
        last = ": use --sae last (saved when the run stopped)" if (run / "last").is_dir() else ""
        raise ValueError(f"{run} has no {args.sae}/ SAE yet{last}")
    sae = WriteSAE.load(run / args.sae, device=args.device)
    site = make_site(model, tok, sae, heads.index(head), site_cfg["layer"], head,
                     site_cfg["write"])
    return site, model_name


def main(argv=None):
    import data
    import train
    args = parse_args(argv)
    if args.dtype != "float32":
        raise ValueError(f"--dtype {args.dtype}: {PRECISION}")
    train.set_tf32(False)  # the same reason: TF32 matmuls would round the logits to ~1e-3
    dtype = getattr(torch, args.dtype)
    loaded = default_run(args, dtype) if args.run is None else None
    run = Path(args.run)
    cfg = run_config(run)
    site, model_name = load_site(args, run, cfg, loaded, dtype)
    model, sae = site.model, site.sae
    blocks, _, val = data.load_blocks(run)
    blocks = blocks[val[:args.max_blocks]]
    meta = {"model": model_name, "arch": model.arch, "layer": site.layer, "head": site.head,
            "write": site.write,
            "sae": f"{run / args.sae} ({sae.cfg.variant}, n_feat {sae.cfg.n_feat}, k {sae.cfg.k}, "
                   f"rank {sae.cfg.rank})",
            "data": f"{len(blocks)} held-out blocks × {blocks.shape[1]} tokens of "
                    f"{cfg['args'].get('data')}",
            "seed": args.seed, "run": str(run.resolve()), "args": vars(args) | {"run": str(run)}}
    out = Path(args.out) if args.out else run / "eval"
    check_report(out, meta)
    figures = model.PAPER_FIGURES
    res = evaluate(site, blocks, args,
                   done=lambda res: write_report(out, res, meta, model.READ_PATH, figures))
    print((out / "report.md").read_text().split("\n## Setup")[0])
    return res


if __name__ == "__main__":
    try:
        failed = [name for name, r in main().items() if "error" in r]
    except (ValueError, OSError) as e:  # bad input: one line that names it
        raise SystemExit(f"eval.py: error: {e}")
    except KeyboardInterrupt:  # the report holds the experiments that finished
        print("eval.py: interrupted", file=sys.stderr)
        raise SystemExit(130)
    if failed:
        raise SystemExit(f"eval.py: error: {', '.join(failed)} failed (named in the report)")
