"""The report: a headline table beside the paper's numbers (PAPER_NOTES.md §10), the architecture's read path,
every deviation from the paper's protocol, and each experiment's full results as JSON (report.md, report.json).

Glossary
  headline  rows (quantity, ours, n, 95% CI, the paper's value and n) built from eval.py's results dict
  PAPER     the paper's figures, keyed like the rows; "key arch" overrides "key" for that architecture
"""

import json
import math

READ_PATH = {
    "qwen35": "GDN: read o = Sᵀq̃ (q̃ = l2(q)/√K); gain = w ⊙ silu(z)/rms(o) (gated RMSNorm, norm then gate); "
              "out_proj. Transport α(I − βk̂k̂ᵀ): the delta-rule erase is what the no-fit G = Πα drops; 'exact' "
              "also uses the gated RMSNorm's full local Jacobian.",
    "mamba2": "Mamba-2: read y = SᵀC_t + D x_t — the D skip does not see the state, so it cancels in Δℓ; gain = "
              "w ⊙ silu(z)/rms(y ⊙ silu(z)) (gate, then norm); out_proj. Transport exp(ΔA) is a scalar: G is exact, "
              "but 'exact' keeps the norm's diagonal gain (its input y + D x needs x, which the writes lack).",
    "rwkv7": "RWKV-7: read o = Sᵀr_t (no scaling); gain = γ/σ ⊙ g (per-head GroupNorm, then the output gate); o_proj. "
             "The bonus (r·k̃·r_k)v bypasses state and norm, so it cancels. G = Π diag(w_s) per key channel; the "
             "exact transport adds the rank-1 erase b(aᵀ·) and needs writes['a'] (absent: 'exact' only at h = 0); "
             "'exact' also uses the GroupNorm's full local Jacobian (centring and σ).",
}
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
        rows += [(f"closed-form R² ({kind}, h = {h}): median cell; at ε = {r['eps'][0]:g}; cells > 0.95",
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

def write_report(out, res, meta):
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, **res}, indent=1, default=float) + "\n")
    L = [f"# WriteSAE evaluation: {meta['model']} layer {meta['layer']} head {meta['head']}", "",
         "| quantity | ours | n | 95% CI | paper (n) |", "|---|---|---|---|---|"]
    L += [f"| {q} | {v} | {n} | {c} | {p} |" for q, v, n, c, p in headline(res, meta["arch"])]
    L += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in meta.items()]
    L += ["", "## Read path and closed form for this architecture", "", READ_PATH[meta["arch"]], "",
          "## Deviations from the paper's protocol", ""] + [f"- {d}" for d in DEVIATIONS]
    for name, r in res.items():
        L += ["", f"## {name}", "", "```json", json.dumps(r, indent=1, default=float), "```"]
    (out / "report.md").write_text("\n".join(L) + "\n")
