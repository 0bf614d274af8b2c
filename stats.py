"""The statistics eval.py reports, in plain torch (no scipy, no sklearn): intervals, paired tests, R², a 1-D
Gaussian mixture.

Glossary
  CI        95% interval: Wilson score for a proportion, percentile bootstrap for a mean or median
  d         paired differences, e.g. KL_delete − KL_atom (> 0: the atom wins); ties |d| ≤ tie count for neither
  sign / Wilcoxon   two-sided paired tests on d, normal approximations (mid-ranks for tied |d|)
  R² (r2)   1 − SS_res/SS_tot of a prediction with no fitted parameter; ols_r2 fits a slope and an intercept
  BIC       −2 log L + (3k − 1) ln n of a k-component mixture; lower is better (sklearn's sign)
"""

import math

import torch

F64 = torch.float64


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
