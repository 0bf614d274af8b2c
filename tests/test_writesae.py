"""writesae.py: decode paths, sparsity rules, AuxK, dead-atom upkeep, save/load, head batching, training."""

import json

import pytest
import torch
from helpers import assert_close

from models.hub import CheckpointError
from writesae import (DeadTracker, SAEConfig, WriteSAE, batch_topk, fve, lr_at, resample_dead_, topk,
                      train_step)

K, V = 8, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds contention on the shared test machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

VARIANTS = [
    pytest.param(dict(variant="write"), id="write-r1"),
    pytest.param(dict(variant="write", rank=2), id="write-r2"),
    pytest.param(dict(variant="write", tied=True), id="write-tied"),
    pytest.param(dict(variant="write", tied=True, rank=2), id="write-tied-r2"),
    pytest.param(dict(variant="matrix"), id="matrix-r1"),
    pytest.param(dict(variant="matrix", rank=2), id="matrix-r2"),
    pytest.param(dict(variant="flat"), id="flat"),
]


def make(n_sae=2, seed=0, **kw):
    cfg = SAEConfig(**{**dict(d_k=K, d_v=V, n_feat=32, k=4, n_sae=n_sae), **kw})
    return WriteSAE(cfg, seed=seed)


def states(h, B, seed=0):
    return torch.randn(h, B, K, V, generator=torch.Generator().manual_seed(seed))


def synthetic(h, B, n_true=12, active=2, seed=0):
    """States that are sparse sums of a few true rank-1 atoms plus a fixed offset: a dictionary exists."""
    g = torch.Generator().manual_seed(seed)
    true_k = torch.nn.functional.normalize(torch.randn(h, n_true, K, generator=g), dim=-1)
    true_v = torch.nn.functional.normalize(torch.randn(h, n_true, V, generator=g), dim=-1)
    offset = torch.randn(h, 1, K, V, generator=g)

    def draw(B, g):
        idx = torch.rand(h, B, n_true, generator=g).argsort(-1)[..., :active]
        a = torch.zeros(h, B, n_true).scatter(-1, idx, 0.5 + torch.rand(h, B, active, generator=g))
        return torch.einsum("hbn,hnk,hnv->hbkv", a, true_k, true_v) + offset
    return draw, g, torch.einsum("hnk,hnv->hnkv", true_k, true_v).flatten(2)


# ---- decode paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("bt", [False, True], ids=["topk", "batchtopk"])
def test_sparse_decode_equals_dense(kw, bt):
    sae = make(batch_topk=bt, **kw)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.uniform_(-0.5, 0.5)
    out = sae(states(2, 16))
    assert_close("forward (sparse) vs decode (dense)", sae.decode(out.codes), out.recon, 1e-5)
    idx = torch.randint(0, 32, (2, 5, 7))  # arbitrary gather, repeated atoms allowed
    vals = torch.rand(2, 5, 7)
    dense = torch.zeros(2, 5, 32).scatter_add(-1, idx, vals)
    assert_close("decode_sparse vs decode", sae.decode(dense), sae.decode_sparse(idx, vals), 1e-5)


@pytest.mark.parametrize("kw", VARIANTS)
def test_encoder_is_the_matched_filter(kw):
    """encode_pre is Table 10 literally: for the bilinear encoder pre_i = Σ_r enc_k[i,r]ᵀ X enc_v[i,r] +
    b_enc, X = S − b_dec, checked against the matched filter ⟨X, E_i⟩ with E_i built by hand."""
    sae = make(**kw)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    S = states(2, 3)
    X = (S - sae.b_dec[:, None]).flatten(2)                                 # [h,B,K·V]
    if kw["variant"] == "write":
        fk, fv = (sae.dec_k, sae.dec_v) if sae.cfg.tied else (sae.enc_k, sae.enc_v)
        E = (fk[..., :, None] * fv[..., None, :]).sum(2).flatten(2)         # [h,n,K·V]  Σ_r k ⊗ v
    else:
        E = sae.W_enc
    ref = X @ E.transpose(1, 2) + sae.b_enc[:, None]
    assert_close("encode_pre", ref, sae.encode_pre(S), 1e-5)


@pytest.mark.parametrize("kw", VARIANTS)
def test_fast_encoder_equals_the_reference(kw):
    """encode_pre_fast (one GEMM, the pre-bias trick for b_dec's gradient) gives encode_pre's values and
    gradients for every parameter."""
    sae = make(**kw)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    S, probe = states(2, 3), torch.randn(2, 3, 32)
    ref = sae.encode_pre(S)
    want = torch.autograd.grad((ref * probe).sum(), list(sae.parameters()), allow_unused=True)
    got = sae.encode_pre_fast(S)
    assert_close("encode_pre_fast", ref, got, 1e-5)
    for (name, p), w, g in zip(sae.named_parameters(), want,
                               torch.autograd.grad((got * probe).sum(), list(sae.parameters()), allow_unused=True)):
        if w is None:
            assert g is None or (g == 0).all(), name
        else:
            assert_close(f"grad {name}", w, g, 1e-5)


# ---- sparsity rules ----------------------------------------------------------------------------------

def test_topk_semantics():
    pre = torch.randn(2, 10, 32)
    pre[0, 0] = -torch.arange(32.0)  # all but one negative: ReLU leaves a single nonzero
    idx, vals = topk(pre, 4)
    codes = torch.zeros_like(pre).scatter(-1, idx, vals)
    assert (codes >= 0).all()
    assert ((codes > 0).sum(-1) <= 4).all() and (codes[0, 0] > 0).sum() == 0
    want = pre.topk(4, dim=-1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, want)
    assert torch.equal(codes.gather(-1, idx), pre.gather(-1, idx).relu())


def test_batch_topk_training_budget_and_threshold_inference():
    sae = make(batch_topk=True, k=3)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: the budget, not ReLU, decides
    S = states(2, 16)
    out = sae(S)  # train mode
    assert ((out.codes > 0).sum((1, 2)) == 3 * 16).all(), "exactly k·B nonzeros per SAE over the batch"
    assert ((out.codes > 0).sum(-1) != 3).any(), "per-state counts vary under BatchTopK"
    kept = batch_topk(out.pre, 3)[1]
    assert_close("θ after one batch = smallest kept", kept.amin(-1), sae.threshold, 1e-6)
    for seed in range(1, 4):
        sae(states(2, 16, seed))
    sae.eval()
    with torch.no_grad():
        full = sae.encode(S)
        alone = torch.cat([sae.encode(S[:, b:b + 1]) for b in range(16)], 1)
        mixed = sae.encode(torch.cat([S[:, :5], 3 * states(2, 40, 9)], 1))[:, :5]
    # the same atoms fire whatever else is in the batch (values up to GEMM rounding, which depends on B)
    assert torch.equal(full > 0, alone > 0) and torch.equal(full[:, :5] > 0, mixed > 0)
    assert_close("codes alone", full, alone, 1e-6)
    assert_close("codes in another batch", full[:, :5], mixed, 1e-6)
    assert torch.equal(full > 0, sae.encode_pre(S) > sae.threshold[:, None, None]), "fires iff pre > θ"
    assert 0 < (full > 0).sum() < full.numel()


# ---- AuxK ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", VARIANTS)
def test_aux_k_gradient_touches_only_dead_atoms(kw):
    sae = make(**kw)
    dead = torch.zeros(2, 32, dtype=torch.bool)
    dead[0, [3, 7, 20]] = True
    dead[1, [5]] = True
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.fill_(5.0)  # dead atoms with a positive pre-activation, so all of them get a gradient
    S = states(2, 16)
    out = sae(S, dead=dead)
    with torch.no_grad():  # the definition: ReLU'd top dead pre-activations, decoded without b_dec, vs S − Ŝ
        a = torch.where(dead[:, None], out.pre, -torch.inf).topk(3, dim=-1)
        want = (sae.decode_sparse(a.indices, a.values.relu(), bias=False) - (S - out.recon)).pow(2).mean((1, 2, 3))
    assert_close("aux", want, out.aux, 1e-6)
    out.aux.sum().backward()  # the aux term alone
    for name, p in sae.atom_params():
        g = p.grad.flatten(2).abs().sum(-1) if p.dim() > 2 else p.grad.abs()  # [h,n]
        assert (g[~dead] == 0).all(), f"{name}: AuxK gradient reaches alive atoms"
        if name.startswith(("dec", "W_dec")):
            assert (g[dead] > 0).all(), f"{name}: AuxK gradient misses dead atoms"


def test_aux_k_zero_without_dead_atoms():
    sae = make()
    dead = torch.zeros(2, 32, dtype=torch.bool)
    dead[1, 0] = True  # head 0 has none: its aux is 0, not the residual's MSE
    out = sae(states(2, 8), dead=dead)
    assert out.aux[0] == 0 and out.aux[1] > 0
    assert torch.equal(sae(states(2, 8)).aux, torch.zeros(2))


# ---- dead atoms: tracking and resampling ---------------------------------------------------------------

def test_dead_tracker_counts_silent_steps():
    cfg = SAEConfig(d_k=K, d_v=V, n_feat=4, k=1, dead_after=2)
    t = DeadTracker(cfg)
    codes = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])  # [h=1,B=2,n=4]
    t.update(codes)
    t.update(torch.tensor([[[1.0, 0, 0, 0]]]))
    assert t.steps.tolist() == [[0, 1, 2, 2]] and t.dead.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("kw", VARIANTS)
def test_resampling_revives_dead_atoms(kw):
    sae = make(**kw)
    cfg = sae.cfg
    S = states(2, 16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    tracker = DeadTracker(cfg)
    out = sae(S)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        sae.b_enc.fill_(0.3)
    tracker.steps[0, [2, 9]] = tracker.steps[1, [4]] = cfg.dead_after
    dead = tracker.dead.clone()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    resample_dead_(sae, opt, S, sae(S).recon.detach(), tracker, step=250)
    assert (tracker.steps == 0).all() and not tracker.dead.any()
    assert (sae.b_enc[dead] == 0).all() and (sae.b_enc[~dead] == 0.3).all()
    for name, p in sae.atom_params():
        changed = (p.detach() != before[name]).flatten(2).any(-1) if p.dim() > 2 else p.detach() != before[name]
        if name != "b_enc":
            assert changed[dead].all() and not changed[~dead].any(), name
        for moment in ("exp_avg", "exp_avg_sq"):
            m = opt.state[p][moment]
            assert (m[dead] == 0).all(), f"{name}.{moment} not reset"
            assert (m[~dead] != 0).any(), f"{name}.{moment} reset for alive atoms"
    X = (S - sae.b_dec[:, None]).flatten(2)  # each revived decoder atom is (the top-r part of) a batch state
    for j, i in dead.nonzero().tolist():
        if cfg.variant == "flat":
            assert_close("unit norm", torch.ones(()), sae.W_dec[j, i].norm(), 1e-6)
            cos = (torch.nn.functional.normalize(X[j], dim=-1) @ sae.W_dec[j, i]).abs().max()
            assert_close("atom = a batch state", torch.ones(()), cos, 1e-6)
        else:
            assert_close("unit factors", torch.ones(cfg.rank, 2), torch.stack(
                [sae.dec_k[j, i].norm(dim=-1), sae.dec_v[j, i].norm(dim=-1)], -1), 1e-6)
            U, _, Vh = torch.linalg.svd(X[j].view(-1, K, V))
            r = cfg.rank
            match = [torch.allclose(U[b, :, :r].T.abs(), sae.dec_k[j, i].abs(), atol=1e-5)
                     and torch.allclose(Vh[b, :r].abs(), sae.dec_v[j, i].abs(), atol=1e-5)
                     for b in range(X.shape[1])]
            assert any(match), "revived factors are not the SVD factors of a batch state"


@pytest.mark.parametrize("kw", VARIANTS)
def test_factors_unit_norm_after_renormalisation(kw):
    sae = make(**kw)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.mul_(torch.rand_like(p) * 3)
    sae.normalize_factors_()
    for name in ["W_dec"] if kw["variant"] == "flat" else ["dec_k", "dec_v"]:
        norms = getattr(sae, name).norm(dim=-1)
        assert_close(f"{name} norms", torch.ones_like(norms), norms, 1e-6)


def test_flat_atom_factors():
    sae = make(variant="flat", rank=1)
    with torch.no_grad():
        a = torch.nn.functional.normalize(torch.randn(K), dim=0)
        b = torch.nn.functional.normalize(torch.randn(V), dim=0)
        sae.W_dec[1, 5] = torch.outer(a, b).flatten()
    k, v = sae.atom(5, head=1)
    assert k.shape == (1, K) and v.shape == (1, V)
    assert_close("flat atom(i) rebuilds a rank-1 row", torch.outer(a, b), k.T @ v, 1e-5)


# ---- save / load -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [VARIANTS[1], VARIANTS[4], VARIANTS[6]])
def test_save_load_round_trip(tmp_path, kw):
    sae = make(seed=7, batch_topk=True, **kw)
    S = states(2, 8)
    sae(S)  # sets the BatchTopK threshold
    sae.save(tmp_path / "sae")
    got = WriteSAE.load(tmp_path / "sae")
    assert got.cfg == sae.cfg and got.seed == 7
    for name, t in sae.state_dict().items():
        assert torch.equal(t, got.state_dict()[name]), name
    sae.eval(), got.eval()
    with torch.no_grad():
        assert torch.equal(sae(S).recon, got(S).recon)


def test_load_rejects_mismatch(tmp_path):
    make().save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "n_feat": 16}))
    with pytest.raises(CheckpointError, match=r"tensor '(b_enc|dec_k|dec_v|enc_k|enc_v)' has shape") as e:
        WriteSAE.load(tmp_path / "sae")
    assert "\n" not in str(e.value)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "variant": "flat"}))
    with pytest.raises(CheckpointError, match="missing tensor 'W_dec'"):
        WriteSAE.load(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "sparsity": "topk"}))
    with pytest.raises(CheckpointError, match="unknown SAEConfig field 'sparsity'"):
        WriteSAE.load(tmp_path / "sae")
    with pytest.raises(CheckpointError, match="cannot find"):
        WriteSAE.load(tmp_path / "nowhere")


@pytest.mark.parametrize("bad, msg", [
    (dict(variant="dense"), "unknown SAE variant 'dense'"),
    (dict(variant="matrix", tied=True), "tied=True needs variant 'write'"),
    (dict(k=0), "k=0 must lie in"),
    (dict(rank=7), "rank=7 must lie in"),
])
def test_bad_config(bad, msg):
    with pytest.raises(ValueError, match=msg):
        make(**bad)


def test_bad_states_shape():
    with pytest.raises(ValueError, match=r"states must be \[h=2,B,K=8,V=6\], got \[1, 4, 8, 6\]"):
        make()(torch.zeros(1, 4, K, V))


# ---- training ------------------------------------------------------------------------------------------

def run(sae, batches, total):
    opt = torch.optim.Adam(sae.parameters(), lr=sae.cfg.lr)
    tracker = DeadTracker(sae.cfg)
    logs = [train_step(sae, opt, S, step, tracker, total) for step, S in enumerate(batches)]
    return logs, tracker


def test_lr_schedule():
    assert lr_at(0, 1000) == 0 and lr_at(25, 1000) == pytest.approx(1.5e-4)
    assert lr_at(50, 1000) == pytest.approx(3e-4) and lr_at(1000, 1000) == pytest.approx(3e-5)
    assert lr_at(10, 40) == pytest.approx(3e-4)  # warmup capped at total/4


@pytest.mark.parametrize("kw", [VARIANTS[0], VARIANTS[5], VARIANTS[6]])
def test_head_batched_saes_are_independent(kw):
    """Head 0 of a 2-head SAE trains exactly like a 1-head SAE on head 0's data (renorm + resampling included)."""
    # n 64, k 1, 32 states a batch: many atoms go silent, so AuxK and resampling (every 3 steps) both act
    common = dict(kw, n_feat=64, k=1, dead_after=2, renorm_every=4, resample_every=3, lr=3e-3, warmup=2)
    S2 = [states(2, 32, seed) for seed in range(12)]
    one = make(n_sae=1, seed=3, **common)
    two = make(n_sae=2, seed=3, **common)
    logs1, t1 = run(one, [S[:1] for S in S2], 12)
    logs2, t2 = run(two, S2, 12)
    assert min(logs1[2]["dead"], logs1[5]["dead"]) > 0 and logs2[5]["dead"] > logs1[5]["dead"]
    assert logs1[6]["aux"] > 0 and torch.equal(t1.steps[0], t2.steps[0])
    for name, p in one.named_parameters():
        assert_close(name, p.detach(), getattr(two, name).detach()[:1], 1e-5)


@pytest.mark.parametrize("kw", [VARIANTS[0], VARIANTS[4], VARIANTS[6],
                                pytest.param(dict(variant="write", batch_topk=True), id="write-batchtopk")])
def test_training_recovers_synthetic_dictionary(kw):
    """States = sparse sums of 12 true rank-1 atoms: FVE climbs from ~0.2 to > 0.95 on held-out states, and with
    rank-1 atoms every true atom is found by a learned one (flat atoms may mix them)."""
    draw, g, true_atoms = synthetic(1, 256)
    batches = [draw(256, g) for _ in range(300)]
    sae = make(n_sae=1, n_feat=32, k=4, lr=1e-2, lr_end=1e-3, warmup=10, **kw)
    sae.init_b_dec_(torch.cat(batches[:4], 1).mean(1))
    logs, _ = run(sae, batches, len(batches))
    held_out = draw(512, g)
    with torch.no_grad():
        sae.eval()
        score = fve(held_out, sae(held_out).recon).item()
        learned = torch.nn.functional.normalize(sae.atoms()[0], dim=-1)                  # [n,K·V]
        match = (true_atoms[0] @ learned.T).max(-1).values                                # [12] cosines
    assert logs[0]["fve"] < 0.5 and score > 0.95, f"FVE {logs[0]['fve']:.3f} -> held-out {score:.3f}"
    if kw["variant"] != "flat":
        assert match.min() > 0.9, f"a true atom is missed: best cosines {match.tolist()}"


def test_same_seed_same_sae():
    batches = [states(1, 32, s) for s in range(8)]
    common = dict(n_sae=1, n_feat=64, k=1, dead_after=2, resample_every=3, lr=3e-3, warmup=1)  # resamples too
    a, b, c = make(seed=5, **common), make(seed=5, **common), make(seed=6, **common)
    for sae in (a, b, c):
        run(sae, batches, 8)
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name
    assert not torch.equal(a.dec_k, c.dec_k)
