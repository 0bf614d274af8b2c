"""eval.py on tiny random models of every architecture, written in their Hub layout and read back by load_model:
the statistics against known values, the substitution identities, the closed form against finite differences on
a model with only the direct path, the install with m = 0, and every experiment end to end."""

import dataclasses
import json

import pytest
import torch

import eval as ev
import writesae
from demo import build as demo
from models import load_model

SMALL = {
    "gdn": dict(hidden_size=32, intermediate_size=48, head_dim=8, num_attention_heads=2, num_key_value_heads=1,
                layer_types=("linear_attention", "full_attention", "linear_attention"), linear_num_key_heads=2,
                linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    "mamba2": dict(d_model=32, n_layer=2, d_state=8, headdim=8),
    "rwkv7": dict(hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64, decay_low_rank_dim=8,
                  a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8),
}
FAST = ["--max-firings", "24", "--cf-prompts", "6", "--cf-atoms", "3", "--cf-h", "0,1,4", "--erase-n", "8",
        "--sign-n", "24", "--install-prompts", "2", "--install-len", "12", "--gen-len", "4", "--amp-prompts", "3",
        "--amp-prompt-len", "8", "--amp-len", "6", "--amp-features", "3", "--boot", "200", "--horizon", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # these are many tiny ops: on a shared CPU a second intra-op thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text():  # fixed prose-like text with sentence ends and line breaks (a seeded word salad: reproducible)
    import random
    words = ("the state of a recurrent model keeps one matrix per head and every token writes a rank one outer "
             "product into it while older writes decay so that a reader can find what was stored there").split()
    g, lines = random.Random(0), []
    for _ in range(300):
        lines.append(" ".join(g.choice(words) for _ in range(g.randint(4, 14))).capitalize() + g.choice(".,;!?"))
    return "".join(line + ("\n" if g.random() < 0.3 else " ") for line in lines)


def build(arch, path, text, layers=None, direct_only=False, sharp=True):
    """A tiny demo-architecture model with a BPE tokenizer, saved in its Hub layout and loaded back."""
    tok = demo.train_tokenizer([text], 300, path / "tokenizer.json")
    over = dict(SMALL[arch])
    if layers is not None:
        over.update({"gdn": {"layer_types": ("linear_attention",) * layers}, "mamba2": {"n_layer": layers},
                     "rwkv7": {"num_hidden_layers": layers}}[arch])
    model = demo.build_model(arch, tok.vocab_size, **over)
    with torch.no_grad():  # sharp: O(1) activations (the demo's 0.02 init leaves a tiny model's logits nearly
        for m in model.modules() if sharp else ():  # state-blind); not sharp: ε → 0 is reached before fp32 noise
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                std = m.weight.shape[-1] ** -0.5 if isinstance(m, torch.nn.Linear) else 1.0
                torch.nn.init.normal_(m.weight, std=std)
        for name, p in model.named_parameters():  # Mamba-2: Δ ≈ 1 (writes of O(1)) with a decay of 0.9 (memory)
            if sharp and arch == "mamba2" and name.endswith(("dt_bias", "A_log")):
                p.fill_(0.5413 if name.endswith("dt_bias") else -2.3026)
    if direct_only:  # no MLP / channel mix: the head's write reaches the logits only through the direct path
        for name, m in model.named_modules():
            if name.endswith(("mlp.down_proj", "ffn.value")):
                torch.nn.init.zeros_(m.weight)
    demo.arch_module(arch).save_pretrained(model, path, dtype=torch.float32)
    model, tok = load_model(path)
    ids = torch.tensor(tok.encode(text)[:6 * 48]).view(6, 48)
    return model, tok, ids


def site_of(model, tok, n_sae=2, seed=0):
    K, V = model.state_shape
    cfg = writesae.SAEConfig(d_k=K, d_v=V, n_feat=32, k=4, rank=2 if model.arch == "rwkv7" else 1, n_sae=n_sae)
    layer = model.write_layers[-1]
    return ev.make_site(model, tok, writesae.WriteSAE(cfg, seed=seed), n_sae - 1, layer, n_sae - 1,
                        model.default_write)


@pytest.fixture(scope="module", params=["gdn", "mamba2", "rwkv7"])
def tiny(request, tmp_path_factory, text):
    model, tok, ids = build(request.param, tmp_path_factory.mktemp(request.param), text)
    return site_of(model, tok), ids


# ---- statistics ---------------------------------------------------------------------------------------------

def test_wilson_matches_known_values():
    for (k, n), (lo, hi) in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775), (4481, 4851): (0.9160, 0.9309),
                             (1, 1): (0.2065, 1.0)}.items():
        got = ev.wilson(k, n)
        assert abs(got[0] - lo) < 1e-4 and abs(got[1] - hi) < 1e-4, (k, n, got)


def test_em_recovers_two_clusters_and_prefers_one_on_one():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.01 * torch.randn(200, generator=g), 0.3 + 0.02 * torch.randn(100, generator=g)])
    mu, var, pi, _, bic2 = ev.gmm_em(x, 2)
    assert abs(mu[0]) < 0.005 and abs(mu[1] - 0.3) < 0.01 and abs(pi[0] - 2 / 3) < 0.01
    assert abs(var[0] ** 0.5 - 0.01) < 0.003 and bic2 < ev.gmm_em(x, 1)[4] - 100
    one = 0.02 * torch.randn(300, generator=g)
    assert ev.gmm_em(one, 2)[4] > ev.gmm_em(one, 1)[4]


def test_sign_stats():
    s = ev.sign_stats(torch.tensor([1.0, 2, 3, -0.5, 0]))
    assert (s["wins"], s["losses"], s["ties"]) == (3, 1, 1) and s["paired_dominance"] == pytest.approx(0.4)
    assert ev.sign_stats(torch.arange(1.0, 41))["wilcoxon_p"] < 1e-6


# ---- substitution identities --------------------------------------------------------------------------------

def test_native_atom_gives_zero_kl_and_a_null_atom_cannot_win(tiny):
    site, ids = tiny
    scans = [ev.scan(site, b) for b in ids[:2]]
    n = site.dec_k.shape[0]
    kls = {}
    for name in ("native", "null"):
        for b, t in [(0, 0)] + [(b, int(writesae.frob(*ev.native(site, scans[b], slice(None))).argmax())) for b in (0, 1)]:
            nk, nv = ev.native(site, scans[b], t)
            if name == "null":
                nk = torch.zeros_like(nk)
            one = dataclasses.replace(site, dec_k=nk.expand(n, -1, -1), dec_v=nv.expand(n, -1, -1))
            sc = dict(scans[b], codes=torch.nn.functional.one_hot(torch.tensor(3), n).float().expand(48, n))
            R = ev.firing_kls(one, ids[b:b + 1], [sc], [(0, t)], torch.Generator().manual_seed(0))
            kls.setdefault(name, []).append(R["kl"][0])
    native, null = torch.stack(kls["native"]), torch.stack(kls["null"])      # [firings, conditions]
    a, d = ev.CONDS.index("atom"), ev.CONDS.index("delete")
    assert native[:, a].abs().max() < 1e-6 < native[:, d].max(), (native[:, a], native[:, d])  # 0 up to fp32 rounding
    assert (null[:, a] == null[:, d]).all() and not (ev.tie(null[:, a], null[:, d]) < null[:, d] - null[:, a]).any()


# ---- closed form ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,eps,hs,floor", [("gdn", "0.003", "0,1,4", 0.99), ("mamba2", "0.03", "0,1,4", 0.97),
                                               ("rwkv7", "0.03", "0", 0.99)])
def test_closed_form_with_exact_transport_matches_finite_differences(arch, eps, hs, floor, tmp_path, text):
    """One write layer and no MLP: the head reaches the logits only through the direct path, so the prediction with
    the exact transport and the exact local norm Jacobians is the first-order finite difference. Mamba-2's gated
    norm sees y + D·x, and x is not in the writes, so its Jacobian stays diagonal: a looser floor. ε is as small as
    fp32 allows (Mamba-2's smaller state reaches the logits' rounding sooner). RWKV-7's transport needs a_t, which
    its writes do not carry: h = 0 only (the read and the GroupNorm Jacobian)."""
    model, tok, ids = build(arch, tmp_path, text, layers=1, direct_only=True, sharp=False)
    site = site_of(model, tok, n_sae=1)
    args = ev.parse_args(["--exp", "closed", "--eps", eps, "--cf-h", hs, "--cf-prompts", "16"])
    res = ev.evaluate(site, ids, args)["closed"]
    for h, c in res["by_h"].items():
        assert min(c["exact"]["median_per_atom"]) >= floor, (h, c["exact"])
        assert min(c["exact_ols"]["median_by_eps"]) >= floor, (h, c["exact_ols"])  # a free slope cannot lose R²


# ---- cache edits ---------------------------------------------------------------------------------------------

def test_install_lift_is_tested_across_prompts():
    """Many targets of one prompt count once: prompt 0's six +1 lifts and prompt 1's one −1 lift average to 0."""
    args = ev.parse_args(["--boot", "200"])
    trial = lambda lift, b: (0, 3.0, False, False, lift, 0, b)  # noqa: E731  (stratum, m, .., lift, rank, prompt)
    two = ev.prompt_level_lift([trial(1.0, 0)] * 6 + [trial(-1.0, 1)], args)
    assert two["lift_prompts"] == 2 and two["lift_prompt_mean"] == 0.0
    many = ev.prompt_level_lift([trial(0.1 + 0.01 * b, b) for b in range(20)], args)
    assert many["lift_wilcoxon_p"] < 1e-3 and 0.1 < many["lift_prompt_ci"][0] < many["lift_prompt_ci"][1] < 0.3


def test_install_with_m_zero_leaves_generation_unchanged(tiny):
    site, ids = tiny
    sc = ev.scan(site, ids[0])
    x = ids[:1, :12]
    base = site.model.generate(x, 6)
    assert torch.equal(site.model.generate(x, 6, edits=ev.install_edits(site, sc, 12, 7, 0.0)), base)
    big = site.model.generate(x, 6, edits=ev.install_edits(site, sc, 12, int(base[0, -1]) ^ 1, 1e4))
    assert not torch.equal(big, base)  # and a large one does change it: the edit reaches generate


def test_every_experiment_end_to_end(tiny, tmp_path):
    site, ids = tiny
    args = ev.parse_args(FAST)
    res = ev.evaluate(site, ids, args)
    assert set(res) == set(ev.EXPERIMENTS)
    assert res["subst"]["all"]["n"] > 0 and 0 <= res["subst"]["all"]["win"] <= 1
    assert res["sign"]["n"] == 24 and res["partition"]["alive"] > 0
    same = lambda r: json.dumps(r, sort_keys=True, default=float)  # noqa: E731  (NaN-safe equality)
    assert same(res) == same(ev.evaluate(site, ids, args))  # deterministic for a seed
    ev.write_report(tmp_path, res, {"model": "tiny", "arch": site.model.arch, "layer": site.layer,
                                    "head": site.head}, site.model.READ_PATH)
    md = (tmp_path / "report.md").read_text()
    assert "| substitution win (all firings) |" in md and "| closed-form R² (ols" in md
    assert site.model.READ_PATH and site.model.READ_PATH in md
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["arch"] == site.model.arch


def test_cli_on_a_train_run(tmp_path, text):
    """train.py's run directory (config.json, blocks, best/) read by eval.main, report written into it."""
    import train
    model, tok, ids = build("gdn", tmp_path / "model", text)
    (tmp_path / "corpus.txt").write_text(text)
    run = tmp_path / "run"
    train.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "corpus.txt"), "--seq-len", "48",
                "--n-seqs", "12", "--epochs", "2", "--n-feat", "32", "--k", "4", "--batch", "64", "--out", str(run),
                "--head", "0,1", "--device", "cpu"])
    res = ev.main(["--run", str(run), "--head", "1", "--device", "cpu"] + FAST)
    md = (run / "eval" / "report.md").read_text()
    assert "layer 2 head 1" in md and "held-out blocks × 48 tokens" in md and res["subst"]["all"]["n"] > 0
    with pytest.raises(ValueError, match="head 3 has no SAE"):
        ev.main(["--run", str(run), "--head", "3", "--exp", "partition"])


def test_cli_default_run_of_a_model(tmp_path, text, monkeypatch):
    """`eval.py --model M` evaluates `train.py --model M`'s default run directory (runs/<M>-L<mid>-H0)."""
    import train
    build("mamba2", tmp_path / "m2", text)
    (tmp_path / "corpus.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    out = train.main(["--model", "m2", "--data", "corpus.txt", "--seq-len", "48", "--n-seqs", "12", "--epochs", "1",
                      "--n-feat", "32", "--k", "4", "--batch", "64", "--device", "cpu"])
    res = ev.main(["--model", "m2", "--device", "cpu", "--exp", "subst"] + FAST)
    assert (out / "eval" / "report.md").exists() and res["subst"]["all"]["n"] > 0


def test_train_and_eval_on_the_demo_model(tmp_path, text):
    """The default model (the committed demo/gdn, at its own site) end to end at reduced sizes."""
    import train
    from demo.build import DEMO_SITES
    (tmp_path / "corpus.txt").write_text(text)
    run = tmp_path / "run"
    train.main(["--data", str(tmp_path / "corpus.txt"), "--seq-len", "64", "--n-seqs", "20", "--epochs", "2",
                "--n-feat", "64", "--k", "4", "--batch", "64", "--out", str(run), "--device", "cpu"])
    cfg = json.loads((run / "config.json").read_text())
    layer, head = DEMO_SITES["gdn"]
    assert cfg["args"]["model"] == "demo/gdn" and cfg["args"]["lr"] == train.DEMO_LR
    assert cfg["site"]["layer"] == layer and cfg["site"]["heads"] == [head]
    res = ev.main(["--run", str(run), "--device", "cpu"] + FAST)
    assert res["subst"]["all"]["n"] > 0 and f"demo/gdn layer {layer} head {head}" in (run / "eval" / "report.md").read_text()
