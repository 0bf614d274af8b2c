"""The statistics of eval.py's reports: intervals, paired tests, fits (torch, fp64; no scipy or
sklearn).

Glossary
  Wilson interval     the score interval of a proportion k/n (Wilson 1927); the paper's win-rate CIs
  median ± MAD/√n     the paper's Table 2 cells (MAD: the median absolute deviation from the median)
  bootstrap CI        percentile interval of a statistic over resamples drawn with replacement
  cluster bootstrap   the same, resampling whole clusters (passages, features) when firings inside
                      one cluster are not independent (App. F.2)
  sign test           wins vs losses among non-zero paired differences (normal approximation)
  Wilcoxon            the signed-rank test of paired differences (normal approximation, mid-ranks)
  paired dominance    (wins − losses) / n
  R² / OLS R²         1 − SS_res / SS_tot of a prediction with no fitted parameter / of one OLS
                      slope plus intercept (the squared Pearson correlation)
  GMM, BIC            a 1-D Gaussian mixture fitted by EM; BIC = −2 log L + (3k − 1) ln n
  crossing            where two weighted Gaussians of a two-component fit cross (§3.1's partition)
  Cohen's d           mean paired difference / its standard deviation
"""

import math

import torch

F64 = torch.float64


def wilson(k, n, z=1.96):
    """Wilson score interval of a proportion k/n (Wilson 1927)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    z2 = z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (mid - half, mid + half)


def median_mad(x):
    """Median and MAD/√n (the paper's Table 2 cells)."""
    x = torch.as_tensor(x, dtype=F64)
    m = x.median()
    return m.item(), ((x - m).abs().median() / math.sqrt(len(x))).item()


def bootstrap_ci(x, stat="mean", n_boot=5000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean or median of x."""
    x = torch.as_tensor(x, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    resamples = x[torch.randint(len(x), (n_boot, len(x)), generator=gen)]     # [n_boot,n]
    s = resamples.mean(1) if stat == "mean" else resamples.median(1).values
    lo, hi = torch.quantile(s, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64))
    return (lo.item(), hi.item())


def cluster_bootstrap(x, clusters, n_boot=5000, seed=0, level=0.95):
    """Percentile interval of the pooled mean of x when whole clusters (passages, features) are
    resampled with replacement (App. F.2): each resample draws as many clusters as there are, and
    its pooled mean is Σx / Σn over the clusters drawn."""
    x = torch.as_tensor(x, dtype=F64)
    ids, inv = torch.as_tensor(clusters).unique(return_inverse=True)
    C = len(ids)
    sums = torch.zeros(C, dtype=F64).index_add_(0, inv, x)                      # [C]
    sizes = torch.bincount(inv, minlength=C).double()                           # [C]
    pick = torch.randint(C, (n_boot, C), generator=torch.Generator().manual_seed(seed))
    times = torch.zeros(n_boot, C, dtype=F64)                                   # [n_boot,C]
    times.scatter_add_(1, pick, torch.ones_like(pick, dtype=F64))               # draws per cluster
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=F64)
    lo, hi = torch.quantile((times @ sums) / (times @ sizes), q)                # [n_boot] -> 2
    return (lo.item(), hi.item())


def normal_p(z):
    """Two-sided p of a standard normal z."""
    return math.erfc(abs(z) / math.sqrt(2))


def sign_stats(d, tie=1e-12):
    """Paired statistics of differences d = KL_delete − KL_atom (> 0 is a win): counts, the sign
    test, the Wilcoxon signed-rank test (normal approximation, mid-ranks), paired dominance
    (wins − losses)/n."""
    d = torch.as_tensor(d, dtype=F64)
    wins = int((d > tie).sum())
    losses = int((d < -tie).sum())
    nonzero = d[d.abs() > tie]
    size, n = nonzero.abs(), len(nonzero)
    srt = size.sort().values
    ranks = (torch.searchsorted(srt, size) + torch.searchsorted(srt, size, right=True) + 1) / 2
    z_w, z_sign = 0.0, 0.0
    if n:
        rank_sum = ranks[nonzero > 0].sum().item()
        z_w = (rank_sum - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        z_sign = (abs(wins - losses) - 1) / math.sqrt(n)
    return {"n": len(d), "wins": wins, "losses": losses, "ties": len(d) - n,
            "sign_p": normal_p(z_sign), "wilcoxon_z": z_w, "wilcoxon_p": normal_p(z_w),
            "paired_dominance": (wins - losses) / max(len(d), 1)}


def r2(y, pred):
    """1 − SS_res / SS_tot with no fitted parameter."""
    return (1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-30)).item()


def ols_r2(y, x):
    """R² of y on one OLS slope plus intercept (= squared Pearson correlation)."""
    c = torch.corrcoef(torch.stack([y, x]).double())[0, 1]
    return (c * c).item() if torch.isfinite(c) else float("nan")


def gmm_em(x, k, n_init=5, iters=300, seed=0):
    """1-D Gaussian mixture with k components by EM, n_init random starts run as a batch.
    Returns (means, vars, weights, log-likelihood, BIC) of the best start, BIC = −2 log L +
    (3k − 1) ln n (lower is better, sklearn's convention), components sorted by mean."""
    x = torch.as_tensor(x, dtype=F64)
    n, gen = len(x), torch.Generator().manual_seed(seed)
    floor = 1e-6 * x.var().item() + 1e-12
    starts = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(n_init)])
    mu = x[starts]                                                    # [I,k] starts at data points
    var = torch.full_like(mu, x.var().item() + floor)
    pi = torch.full_like(mu, 1 / k)
    xs = x[None, :, None]                                             # [1,n,1]
    for _ in range(iters):
        logp = -0.5 * ((xs - mu[:, None]) ** 2 / var[:, None] + (2 * math.pi * var[:, None]).log())
        logp = logp + pi[:, None].log()                               # [I,n,k]
        ll = torch.logsumexp(logp, 2).sum(1)                          # [I]
        resp = (logp - torch.logsumexp(logp, 2, keepdim=True)).exp()  # E-step
        nk = resp.sum(1).clamp_min(1e-12)                             # M-step [I,k]
        mu = (resp * xs).sum(1) / nk
        pi = nk / n
        var = (resp * (xs - mu[:, None]) ** 2).sum(1) / nk + floor
    best = int(ll.argmax())
    o = mu[best].argsort()
    bic = -2 * ll[best].item() + (3 * k - 1) * math.log(n)
    return mu[best, o].tolist(), var[best, o].tolist(), pi[best, o].tolist(), ll[best].item(), bic


def crossing(mu, var, pi):
    """The register / bundle threshold of a two-component fit: the x where the weighted Gaussians
    w·N(x; m, v) cross with the higher-mean (register) one taking over to the right (with unequal
    variances the broader one also wins far out on its other side: that tail is no threshold).
    The midpoint of the means where the curves do not cross."""
    (m1, m2), (v1, v2), (w1, w2) = mu, var, pi
    a = 1 / v2 - 1 / v1                               # the register wins where ax² + bx + c < 0
    b = 2 * (m1 / v1 - m2 / v2)
    c = m2 ** 2 / v2 - m1 ** 2 / v1 + math.log(v2 / v1) - 2 * math.log(w2 / w1)
    disc = b * b - 4 * a * c
    if abs(a) < 1e-9 * (1 / v1 + 1 / v2):
        roots = [-c / b] if b else []
    else:
        roots = [(-b + s * math.sqrt(disc)) / (2 * a) for s in (1, -1)] if disc >= 0 else []
    up = [x for x in roots if 2 * a * x + b < 0]
    return up[0] if up else (m1 + m2) / 2


def paired_summary(base, cond, n_boot=5000, seed=0):
    """Mean change cond − base with bootstrap CI, sign-flip permutation p (10⁴), paired Cohen's
    d."""
    base = torch.as_tensor(base, dtype=F64)
    cond = torch.as_tensor(cond, dtype=F64)
    d = cond - base
    gen = torch.Generator().manual_seed(seed)
    flips = torch.randint(0, 2, (10000, len(d)), generator=gen).double() * 2 - 1
    sd = d.std().item() if len(d) > 1 else float("nan")
    return {"mean_base": base.mean().item(), "mean": cond.mean().item(), "diff": d.mean().item(),
            "ci": bootstrap_ci(d, "mean", n_boot, seed),
            "perm_p": ((flips * d).mean(1).abs() >= d.mean().abs() - 1e-12).double().mean().item(),
            "cohen_d": d.mean().item() / sd if sd and sd > 0 else float("nan")}
