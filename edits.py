"""State edits at one site, used by eval.py's experiments: how they run (one unedited scan per held-out block, then
every edited condition branched from the cached prefix) and the math they follow (the substitutes of the
substitution test's conditions, the exact in-layer transport of a perturbation, Eq. (1)'s closed-form logit shift,
the install write of App. I).

Glossary (PAPER_NOTES.md §5–§7)
  site         one (layer ℓ, head h) of a model with the SAE trained on its states S_t [K,V]
  scan         one unedited forward of a block: the head's writes, ‖S_t‖, the reads, the SAE codes, the final
               norm's local Jacobian at every position
  branch       prefill the block once up to t (one cache walked along it), then cache.repeat(n) and one forward of
               token t (+ n_after) with one edited row per condition
  (k, v)       a rank-r matrix Σ_r k_r v_rᵀ held as its factors k [..,r,K], v [..,r,V]; never formed
  W_nat        the native write at t; a_{i*} A_{i*} the dominant atom's term that replaces it
  δS, G        a perturbation of S_{t0}; G = Π_{s=t0+1}^{t} α_s its decay up to t (Eq. 1 drops the erase term)
  q̃, g         the read vector at t, the head norm's local (diagonal) gain; W_O [D,V] the head's out-projection
  W_U[tok]     unembedding rows, already carried back through the final norm's local Jacobian
  v*_T         W_O[h]ᵀ W_U[T] / ‖·‖, the value direction that most raises T's logit (App. I.5)
"""

import dataclasses
import math

import torch
from tqdm import tqdm

from models import Capture, Edit
from writesae import WriteSAE


# ==== The site: model, layer, head, SAE; one unedited scan per held-out block; edits branched from a cache ====

FINAL_NORM = {"qwen35": "model.norm", "mamba2": "backbone.norm_f", "rwkv7": "model.norm"}  # feeds the unembedding
HEAD_NORM_EPS = {"qwen35": lambda c: c.rms_norm_eps, "rwkv7": lambda c: c.head_dim * c.norm_eps}

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
    fn, xs = site.model.get_submodule(FINAL_NORM[site.model.arch]), []
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


# ==== The math of the edits ====

def frob(k, v):
    """‖Σ_r k_r v_rᵀ‖_F from the factors k [..,r,K], v [..,r,V] without forming the matrix."""
    return ((k @ k.transpose(-1, -2)) * (v @ v.transpose(-1, -2))).sum((-1, -2)).clamp_min(0).sqrt()


def frob_cos(k1, v1, k2, v2):
    """Signed Frobenius cosine ⟨A, W⟩_F / ‖A‖‖W‖ between two factored matrices (broadcast over leading dims)."""
    inner = ((k1 @ k2.transpose(-1, -2)) * (v1 @ v2.transpose(-1, -2))).sum((-1, -2))
    return inner / (frob(k1, v1) * frob(k2, v2)).clamp_min(1e-30)


def substitution_factors(dec_k, dec_v, code, nat_k, nat_v, gen):
    """The substitutes X of the three conditions at one firing (DESIGN.md §4), as factors (k [r,K], v [r,V]).

    dec_k [n,r,K], dec_v [n,r,V] the decoder atoms; code [n] the TopK code a(t); nat_k, nat_v the native write.
    delete is None (X = 0). The Gaussian factors are drawn per firing from gen (CPU)."""
    i = int(code.argmax())
    dk, dv = dec_k[i], dec_v[i]
    atom = (code[i] * dk, dv)                                                 # a_{i*} A_{i*}
    rk = torch.randn(dk.shape, generator=gen).to(dk)
    rv = torch.randn(dv.shape, generator=gen).to(dv)
    n_atom, n_nat, n_rand, n_unit = frob(*atom), frob(nat_k, nat_v), frob(rk, rv), frob(dk, dv)
    return {"atom": atom, "delete": None, "random": (rk * n_atom / n_rand, rv),
            "atom_matched": (dk * n_nat / n_unit, dv), "random_matched": (rk * n_nat / n_rand, rv)}


def transport_key(arch, key, w):
    """One step of the exact in-layer transport of a perturbation's key factor: δS_s = M_s δS_{s−1} acts on the
    key side only (the inputs at s do not depend on this layer's state), so key ← M_s key, value unchanged.

    key [..,r,K]; w the writes at s (head axis removed, no time axis). GDN: M = α (I − β k̂ k̂ᵀ) (the delta-rule
    erase); Mamba-2: M = exp(Δ A) (a scalar decay, exact); RWKV-7: M = diag(w) + b aᵀ (the rank-1 erase; needs
    writes["a"], and b is the increment's second key factor). None when the writes lack what M needs."""
    d = w["decay"][..., None, :]                                              # [..,1,Kd]
    if arch == "qwen35":
        k = w["add_k"][..., :1, :]                                            # [..,1,K] unit key
        return d * (key - w["beta"][..., None, None] * (key * k).sum(-1, keepdim=True) * k)
    if arch == "rwkv7":
        if "a" not in w:
            return None
        return d * key + (key * w["a"][..., None, :]).sum(-1, keepdim=True) * w["inc_k"][..., 1:2, :]
    return d * key


def norm_jacobian(arch, o, v, eps):
    """The head norm's exact local Jacobian at the read o [..,V], divided by its diagonal gain, applied to value
    factors v [..,r,V]: GDN (RMSNorm, eps): v − ô⟨ô, v⟩ with ô = o / √(V (mean o² + eps)); RWKV-7 (GroupNorm):
    the same on the centred o and v; Mamba-2: v unchanged (its norm sees y ⊙ silu(z) with y = SᵀC + D x, and x is
    not in the writes, so the diagonal gain is all we have)."""
    if arch == "mamba2":
        return v
    if arch == "rwkv7":
        o, v = o - o.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)
    o = (o * torch.rsqrt(o.shape[-1] * (o.pow(2).mean(-1, keepdim=True) + eps)))[..., None, :]  # [..,1,V]
    return v - (v * o).sum(-1, keepdim=True) * o


def logit_shift_prediction(eps, key, q, gain, dec_v, W_O, W_U_tok):
    """Eq. (1) in our orientation: Δℓ_tok ≈ ε Σ_r ⟨key_r, q̃_t⟩ ⟨W_O[h](g_t ⊙ dec_v_r), W_U[tok]⟩.

    key [..,r,K] the key factor carried to t (G·dec_k, or the exact transport); q [..,K]; gain [..,V];
    dec_v [..,r,V]; W_O [D,V]; W_U_tok [..,n_tok,D] (rows already scaled by the final norm's local gain)."""
    read = (key * q[..., None, :]).sum(-1)                                    # [..,r]
    resid = (gain[..., None, :] * dec_v) @ W_O.T                              # [..,r,D]
    return eps * torch.einsum("...r,...rd,...nd->...n", read, resid, W_U_tok)  # [..,n_tok]


def install_direction(W_O, W_U_T):
    """v*_T = W_O[h]ᵀ W_U[T] / ‖·‖: the unit value-side direction whose write most raises token T's logit."""
    v = W_U_T @ W_O                                                           # [..,V]
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def shift_predictions(arch, dk, dv, w, t0, hs, unembed, read, W_O, eps):
    """Eq. (1) per unit ε at t0 + h (h in hs) for dk ⊗ dv [A,r,K], [A,r,V] added to S_{t0}: 'nofit' carries the key
    by G = Π decay (no erase term) through the head norm's diagonal gain; 'exact' by transport_key and the head
    norm's exact local Jacobian (NaN where the writes lack what the transport needs). w the writes [T,..];
    unembed(s) -> W_U rows through the final norm at s [A,n_tok,D]; read [T,V] the unedited reads.  -> 2 × [A,Hn,n_tok]"""
    key_g, key_x, P, X = dk.clone(), dk.clone(), [], []
    for s in range(t0, t0 + max(hs) + 1):
        if s > t0:
            w_s = {n: x[s] for n, x in w.items()}
            key_g = w_s["decay"][None, None] * key_g
            key_x = None if key_x is None else transport_key(arch, key_x, w_s)
        if s - t0 in hs:
            U = unembed(s)
            P.append(logit_shift_prediction(1.0, key_g, w["query"][s], w["gain"][s], dv, W_O, U))
            X.append(torch.full_like(P[-1], float("nan")) if key_x is None else logit_shift_prediction(
                1.0, key_x, w["query"][s], w["gain"][s], norm_jacobian(arch, read[s], dv, eps), W_O, U))
    return torch.stack(P, 1), torch.stack(X, 1)


def install_factors(w, s, v, m=1.0):
    """m·‖k_s v_sᵀ‖·k̂_s ⊗ v (App. I.6): the native key direction at s, sized like its write without β.
    w the writes [T,..]; v [n,V] unit value directions.  -> ([1,K], [n,V])"""
    k = w["add_k"][s, :1]                                                     # [1,K]
    size = frob(k, w["add_v"][s, :1]) / (w["beta"][s] if "beta" in w else 1.0)
    return m * size * (k / k.norm().clamp_min(1e-30)), v


def atom_write_cosines(dec_k, dec_v, codes, nat_k, nat_v, chunk=8192):
    """Signed Frobenius cosine of each firing atom with the native write at its position.
    codes [T,n]; nat_k [T,r',K], nat_v [T,r',V].  -> cos, atom id [firings]"""
    pos, atom = (codes > 0).nonzero(as_tuple=True)
    cos = [frob_cos(dec_k[a], dec_v[a], nat_k[p], nat_v[p]) for p, a in zip(pos.split(chunk), atom.split(chunk))]
    return (torch.cat(cos) if cos else codes.new_zeros(0)), atom
