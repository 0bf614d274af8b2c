"""The performance figures quoted in docs/PERFORMANCE.md, each as a ratio against its baseline measured in
the same run.

  python bench.py                 # every benchmark
  python bench.py gdn mamba2      # some of them (names below)
  python bench.py --device cuda  # the paper-scale SAE step at --heads 16 (on a CPU: 2)

Timing: both sides warmed up, then >= 5 interleaved repetitions, median reported (the machines are
noisy; only ratios measured in one run are comparable). Peak memory: the tensor memory a call
allocates at its peak, as torch's allocator counts it (max_memory_allocated on CUDA, the profiler's
allocation events on a CPU).
"""

import argparse
import inspect
import os
import statistics
import time
from functools import partial

# quiet the CPU memory profiler's start/stop lines, and its note on blocks freed that it saw no
# allocation of
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
import torch  # noqa: E402

BENCHES = {}


def bench(name):
    def register(fn):
        BENCHES[name] = fn
        return fn
    return register


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device="cpu", reps=5, warmup=1) -> dict:
    """Median seconds per call of each fn, the calls interleaved so that machine noise hits all
    sides alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(setup, run, device="cpu") -> float:
    """Peak tensor memory (MB) that run(setup()) allocates above what setup() left allocated, as
    torch's allocator counts it: max_memory_allocated on CUDA, the profiler's allocation events on
    a CPU. (A CPU's resident set is no measure here: it depends on what earlier benchmarks in the
    same process left in the heap.)"""
    state = setup()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        run(state)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # + allocation, − free, in time order
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def report(title, rows):
    """rows: list of (label, value string). Printed as a small markdown table."""
    print(f"\n### {title}\n\n| measurement | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


def whole_forward(ours, theirs, ids, device, reps, goal, label,
                  load=lambda a, b: b.load_state_dict(a.state_dict())):
    """Our model vs transformers' on the same ids: peak memory (each side built alone), then time
    with our model carrying transformers' weights."""
    def forward(m):
        with torch.no_grad():
            return m(ids).logits

    mem = {name: peak_memory(make, forward, device)
           for name, make in (("ours", ours), ("transformers", theirs))}
    a, b = theirs(), ours()
    load(a, b)
    ref, got = forward(a), forward(b)
    err = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    out_mb = ref.numel() * ref.element_size() / 2**20
    W_U = b.lm_head_weight().detach()
    x = torch.randn(ids.shape[1], W_U.shape[1], device=device)
    t = time_interleaved({"ours": lambda: forward(b), "transformers": lambda: forward(a),
                          "head": lambda: x @ W_U.T}, device, reps)
    rest = {k: t[k] - t["head"] for k in ("ours", "transformers")}
    return [(f"whole forward {label}: time ours / transformers (goal <= {goal}x)",
             f"{t['ours'] / t['transformers']:.2f}x ({t['ours'] * 1e3:.0f} ms / "
             f"{t['transformers'] * 1e3:.0f} ms; logits rms-rel {err:.1e})"),
            (f"the same without the output head's matmul ({t['head'] * 1e3:.0f} ms, identical on "
             f"both sides)",
             f"{rest['ours'] / rest['transformers']:.2f}x"),
            (f"whole forward: peak memory ours / transformers (goal <= {goal}x)",
             f"{mem['ours'] / mem['transformers']:.2f}x ({mem['ours']:.0f} MB / "
             f"{mem['transformers']:.0f} MB)"),
            (f"the same above the logits ({out_mb:.0f} MB, the output both sides return)",
             f"{(mem['ours'] - out_mb) / (mem['transformers'] - out_mb):.2f}x "
             f"({mem['ours'] - out_mb:.1f} MB / {mem['transformers'] - out_mb:.1f} MB)")]


# ================================================================================================
# Benchmarks. Each registers under a short name and prints its own table of ratios.
# ================================================================================================

# ---- gdn (models/qwen35.py) ----------------------------------------------------------------------

@bench("gdn")
def bench_gdn(device="cpu", reps=5):
    """GDN scan at Qwen3.5-0.8B head dims: chunked vs the token loop, ours vs transformers'
    torch_chunk_gated_delta_rule; then the whole forward vs transformers' Qwen3_5ForCausalLM (0.8B
    widths, 4 layers L L L F, vocab reduced to 32768 — the lm_head matmul is the same on both
    sides)."""
    import sys
    # hidden, else transformers binds fla's Triton kernels
    for name in ("fla", "mamba_ssm", "causal_conv1d", "triton"):
        sys.modules[name] = None
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
    from models import qwen35

    gen = torch.Generator().manual_seed(0)
    cfg = Qwen3_5TextConfig(vocab_size=32768, hidden_size=1024, intermediate_size=3584,
                            num_hidden_layers=4,
                            layer_types=["linear_attention"] * 3 + ["full_attention"],
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                            linear_num_key_heads=16, linear_num_value_heads=16,
                            linear_key_head_dim=128, linear_value_head_dim=128,
                            tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                             "partial_rotary_factor": 0.25})
    ids = torch.randint(0, cfg.vocab_size, (1, 512), generator=gen).to(device)

    def theirs():
        torch.manual_seed(0)
        return Qwen3_5ForCausalLM(cfg).to(device).eval()

    def ours():  # random weights: the memory measurement builds each side alone
        model = qwen35.Qwen35ForCausalLM(qwen35.Qwen35Config.from_hf(cfg.to_dict()))
        return model.to(device).eval()

    rows = whole_forward(ours, theirs, ids, device, reps, "1.0", "0.8B widths, 4 layers, T=512")

    B, T, H, K, V = 1, 1024, 16, 128, 128
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    x = {"q": qwen35.l2norm(r(B, T, H, K)) * K ** -0.5, "k": qwen35.l2norm(r(B, T, H, K)),
         "v": r(B, T, H, V),
         "g": -r(B, T, H).exp() * torch.nn.functional.softplus(r(B, T, H)),
         "beta": torch.sigmoid(r(B, T, H))}
    hf_chunk = getattr(hf.torch_chunk_gated_delta_rule, "__wrapped__",
                       hf.torch_chunk_gated_delta_rule)
    q_raw = x["q"] * K ** 0.5  # transformers applies the K^-1/2 itself
    with torch.no_grad():
        t = time_interleaved({"recurrent": lambda: qwen35.recurrent(x),
                              "chunked": lambda: qwen35.chunked(x),
                              "transformers": lambda: hf_chunk(q_raw, x["k"], x["v"], g=x["g"],
                                                               beta=x["beta"],
                                                               output_final_state=True)},
                             device, reps)
    rows += [(f"GDN scan H={H} K=V={K} T={T} fp32: recurrent / chunked (goal >= 8x)",
             f"{t['recurrent'] / t['chunked']:.1f}x ({t['recurrent'] * 1e3:.0f} ms / "
             f"{t['chunked'] * 1e3:.1f} ms)"),
            ("ours chunked / transformers torch_chunk_gated_delta_rule (goal <= 1.0x)",
             f"{t['chunked'] / t['transformers']:.2f}x ({t['transformers'] * 1e3:.1f} ms theirs)")]

    report(f"gdn ({device})", rows)

# ---- mamba2 (models/mamba2.py) -------------------------------------------------------------------

@bench("mamba2")
def bench_mamba2(device="cpu", reps=5):
    """Whole forward vs transformers' Mamba2ForCausalLM torch path (370m widths, 4 layers, vocab
    50288): peak memory (measured first, before any forward of this process) and time; then the SSD
    scan at mamba2-370m head dims: chunked vs the token loop, ours vs transformers'
    mamba2_chunk_scan."""
    import sys
    # hidden, else transformers binds mamba_ssm's kernels
    for name in ("fla", "mamba_ssm", "causal_conv1d", "triton"):
        sys.modules[name] = None
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM as HFModel
    from transformers.models.mamba2 import modeling_mamba2 as hf
    from models import mamba2

    B, T, H, P, N = 1, 1024, 32, 64, 128
    gen = torch.Generator().manual_seed(0)
    cfg = HFConfig(hidden_size=1024, num_hidden_layers=4, vocab_size=50288, num_heads=32,
                   head_dim=64, state_size=128, n_groups=1, chunk_size=256,
                   tie_word_embeddings=True)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)

    def theirs():
        torch.manual_seed(0)
        return HFModel(cfg).to(device).eval()

    def ours():  # random weights: the memory measurement builds each side alone
        model = mamba2.Mamba2ForCausalLM(mamba2.Mamba2Config.from_hf(cfg.to_dict()))
        return model.to(device).eval()

    rows = whole_forward(ours, theirs, ids, device, reps, "0.7", f"370m widths, 4 layers, T={T}",
                         load=lambda a, b: b.load_state_dict({  # all but the tied head
                             n: w for n, w in a.state_dict().items() if n != "lm_head.weight"}))

    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    dt_raw, A = r(B, T, H) - 2, -torch.rand(H, generator=gen).to(device) * 4
    x = {"x": r(B, T, H, P), "dt": torch.nn.functional.softplus(dt_raw), "B": r(B, T, 1, N),
         "C": r(B, T, 1, N)}
    kw = {"A": A, "D": r(H)}
    hf_scan = getattr(hf.mamba2_chunk_scan, "__wrapped__", hf.mamba2_chunk_scan)
    with torch.no_grad():
        t = time_interleaved({
            "recurrent": lambda: mamba2.recurrent(x, **kw),
            "chunked": lambda: mamba2.chunked(x, **kw),
            "transformers": lambda: hf_scan(x["x"], dt_raw, A, x["B"], x["C"], chunk_size=256,
                                            D=kw["D"], dt_softplus=True,
                                            return_final_states=True)}, device, reps)
    rows += [(f"SSD scan H={H} P={P} N={N} T={T} fp32: recurrent / chunked (goal >= 5x)",
              f"{t['recurrent'] / t['chunked']:.1f}x ({t['recurrent'] * 1e3:.0f} ms / "
              f"{t['chunked'] * 1e3:.1f} ms)"),
             ("ours chunked (chunk 64) / transformers mamba2_chunk_scan (chunk 256)",
              f"{t['chunked'] / t['transformers']:.2f}x ({t['transformers'] * 1e3:.1f} ms theirs)")]
    report(f"mamba2 ({device})", rows)


# ---- rwkv7 (models/rwkv7.py) ---------------------------------------------------------------------

@bench("rwkv7")
def bench_rwkv7(device="cpu", reps=5):
    """RWKV-7 scan at 1.5B head dims: chunked vs the token loop; then the whole prefill vs the
    `rwkv` package's forward (strategy "<device> fp32", its pure-torch per-token loop) at 1.5B
    widths, 2 layers, vocab reduced to 1024 (the head matmul is the same on both sides), on a random
    BlinkDL .pth that both load."""
    import math
    import tempfile
    from pathlib import Path
    os.environ.update(RWKV_V7_ON="1", RWKV_CUDA_ON="0")
    import rwkv.model
    from models import rwkv7

    B, T, H, K = 1, 1024, 32, 64
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=gen) * scale  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    x = dict(r=rnd(B, T, H, K), w=-math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, K)),
             k=rnd(B, T, H, K), v=rnd(B, T, H, K), a=-kk, b=kk * torch.sigmoid(rnd(B, T, H, K)))
    x = {n: t.to(device) for n, t in x.items()}
    with torch.no_grad():
        err = max((a - b).pow(2).mean().sqrt().item() / a.pow(2).mean().sqrt().item()
                  for a, b in zip(rwkv7.recurrent(x)[:2], rwkv7.chunked(x)[:2]))
        t = time_interleaved({"recurrent": lambda: rwkv7.recurrent(x),
                              "chunked": lambda: rwkv7.chunked(x),
                              "chunked64": lambda: rwkv7.chunked(x, chunk_size=64)}, device, reps)
    rows = [(f"RWKV-7 scan H={H} K=V={K} T={T} fp32: recurrent / chunked L=32 (goal >= 3x)",
             f"{t['recurrent'] / t['chunked']:.1f}x ({t['recurrent'] * 1e3:.0f} ms / "
             f"{t['chunked'] * 1e3:.1f} ms; rms-rel {err:.1e})"),
            ("recurrent / chunked L=64",
             f"{t['recurrent'] / t['chunked64']:.1f}x ({t['chunked64'] * 1e3:.1f} ms)")]

    C, L, vocab, ranks, ffn = 2048, 2, 1024, dict(w=96, a=96, v=64, g=256), 8192
    sd = {"emb.weight": rnd(vocab, C), "blocks.0.ln0.weight": torch.ones(C),
          "blocks.0.ln0.bias": torch.zeros(C), "ln_out.weight": torch.ones(C),
          "ln_out.bias": torch.zeros(C), "head.weight": rnd(vocab, C, scale=C ** -.5)}
    for i in range(L):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2", "att.ln_x"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.ones(C), torch.zeros(C)
        for m in "rwkvag":
            sd[p + f"att.x_{m}"] = torch.rand(1, 1, C, generator=gen)
        for m, D in ranks.items():
            if m != "g":
                sd[p + f"att.{m}0"] = rnd(1, 1, C)
            sd[p + f"att.{m}1"] = rnd(C, D, scale=C ** -.5)
            sd[p + f"att.{m}2"] = rnd(D, C, scale=D ** -.5)
        sd[p + "att.k_k"] = torch.ones(1, 1, C)
        sd[p + "att.k_a"] = torch.ones(1, 1, C)
        sd[p + "att.r_k"] = rnd(H, K)
        for n in ("receptance", "key", "value", "output"):
            sd[p + f"att.{n}.weight"] = rnd(C, C, scale=C ** -.5)
        sd[p + "ffn.x_k"] = torch.rand(1, 1, C, generator=gen)
        sd[p + "ffn.key.weight"] = rnd(ffn, C, scale=C ** -.5)
        sd[p + "ffn.value.weight"] = rnd(C, ffn, scale=ffn ** -.5)
    ids = torch.randint(0, vocab, (1, T), generator=gen)
    with tempfile.TemporaryDirectory() as d:
        torch.save(sd, Path(d) / "wide.pth")
        del sd
        theirs = rwkv.model.RWKV(model=str(Path(d) / "wide"), strategy=f"{device} fp32")
        vocab_file = Path(rwkv.model.__file__).parent / rwkv7.WORLD_VOCAB
        ours, _ = rwkv7.from_pretrained(Path(d) / "wide.pth", device=device, tokenizer=vocab_file)
    with torch.no_grad():
        ref = theirs.forward(ids[0].tolist(), None, full_output=True)[0]
        got = ours(ids.to(device)).logits[0]
        err = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        # the floor: every nn.Linear of the model once over T tokens, which any implementation must
        # compute
        weights = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]
        xs = {w.shape[1]: torch.randn(T, w.shape[1], generator=gen).to(device) for w in weights}
        t = time_interleaved({
            "package": lambda: theirs.forward(ids[0].tolist(), None, full_output=True),
            "ours": lambda: ours(ids.to(device)),
            "floor": lambda: [xs[w.shape[1]] @ w.T for w in weights]}, device, reps)
    rows += [(f"prefill C={C} H={H} LoRA 96/96/64/256 ffn {ffn} vocab {vocab}, {L} layers, T={T}: "
              "rwkv package / ours chunked (goal >= 5x)",
              f"{t['package'] / t['ours']:.1f}x ({t['package']:.2f} s / {t['ours']:.2f} s; "
              f"logits rms-rel {err:.1e})"),
             ("the same model's nn.Linear matmuls alone: the most any prefill can beat the "
              "package by",
              f"{t['package'] / t['floor']:.1f}x ({t['floor']:.2f} s; ours = floor x "
              f"{t['ours'] / t['floor']:.2f})")]
    report(f"rwkv7 ({device})", rows)


# ---- sae (writesae.py, train.py) -----------------------------------------------------------------

def _sae_step_setup(variant, device, K=128, V=128, n_feat=2048, k=32, batch=256, heads=1):
    """A trained-for-one-step SAE of `heads` heads (so Adam's moments exist), states [h,B,K,V]."""
    from writesae import DeadTracker, SAEConfig, WriteSAE, train_step
    cfg = SAEConfig(d_k=K, d_v=V, variant=variant, n_feat=n_feat, k=k, n_sae=heads)
    sae = WriteSAE(cfg, seed=0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    tracker = DeadTracker(cfg, device=device)
    g = torch.Generator().manual_seed(0)
    S = torch.randn(heads, batch, K, 4, generator=g) @ torch.randn(heads, batch, 4, V, generator=g)
    S = S.to(device)
    train_step(sae, opt, S, 1, tracker, 1000)
    # the base: parameters, Adam moments, data; gradients belong to the step
    opt.zero_grad(set_to_none=True)
    return sae, opt, S, tracker


@bench("sae")
def bench_sae(device="cpu", reps=5, heads=None):
    """One training step (forward, backward, Adam) of the write SAE vs a flat TopK SAE of the same
    n_feat and k (K = V = 128, n_feat 2048, k 32, batch 256). Both decode sparsely (gather + bmm /
    embedding_bag)."""
    from writesae import train_step
    sides = {v: _sae_step_setup(v, device) for v in ("write", "flat")}
    steps = {v: (lambda s=s: train_step(*s[:2], s[2], 2, s[3], 1000)) for v, s in sides.items()}
    t = time_interleaved(steps, device=device, reps=reps)
    del sides, steps
    mem = {v: peak_memory(lambda v=v: _sae_step_setup(v, device),
                          lambda s: train_step(s[0], s[1], s[2], 2, s[3], 1000), device)
           for v in ("write", "flat")}
    report("SAE training step (K = V = 128, n_feat 2048, k 32, batch 256)", [
        ("write SAE step", f"{t['write'] * 1e3:.1f} ms"),
        ("flat TopK SAE step", f"{t['flat'] * 1e3:.1f} ms"),
        ("time ratio write / flat (goal ≤ 1.0)", f"{t['write'] / t['flat']:.2f}×"),
        ("peak memory write / flat (goal ≤ 1.0)", f"{mem['write']:.0f} / {mem['flat']:.0f} MB = "
                                                  f"{mem['write'] / max(mem['flat'], 1e-9):.2f}×"),
    ])
    # the paper-scale step: the heads of one layer as one batch of SAEs (train.py --head all)
    heads = heads or (16 if str(device).startswith("cuda") else 2)
    setup = lambda: _sae_step_setup("write", device, heads=heads)  # noqa: E731
    step = lambda s: train_step(s[0], s[1], s[2], 2, s[3], 1000)   # noqa: E731
    sec = time_interleaved({"step": partial(step, setup())}, device=device, reps=reps)["step"]
    peak = peak_memory(setup, step, device)
    report(f"paper-scale write-SAE step: {heads} heads as one batch of SAEs ({device})", [
        ("steps per second", f"{1 / sec:.2f} ({sec * 1e3:.0f} ms a step)"),
        ("states per second (heads × batch 256)", f"{heads * 256 / sec:,.0f}"),
        ("peak memory of a step", f"{peak:.0f} MB")])


@bench("store")
def bench_store(device="cpu", reps=5):
    """The factor store of train.py (data.py): bytes on disk a token a head against storing the
    state (K = V = 128), and states per second from stored factors (fp16) through the fp32 rebuild,
    alone and into write-SAE training steps (n_feat 2048, k 32, batch 256; 32 blocks of 256 tokens,
    64 positions each)."""
    import tempfile
    from pathlib import Path

    import data
    from writesae import DeadTracker, SAEConfig, WriteSAE, train_step
    K = V = 128
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, r, Kd in (("GDN / Mamba-2 (r = 1, scalar decay)", 1, 1),
                            ("RWKV-7 (r = 2, decay per key)", 2, K)):
            root = Path(tmp) / str(r)
            data.FactorStore.create(root, 4, 64, 1, r, K, V, Kd, "float16")
            per = sum(f.stat().st_size for f in root.glob("*.bin")) / (4 * 64)
            rows.append((f"{name}: fp16 factors a token a head",
                         f"{per:.0f} B; the state is {K * V * 4} B in fp32 "
                         f"({K * V * 4 / per:.0f}×), {K * V * 2} B in fp16 "
                         f"({K * V * 2 / per:.0f}×; goal ≥ 50×)"))
        N, T = 32, 256
        g = torch.Generator().manual_seed(0)
        store = data.FactorStore.create(Path(tmp) / "e2e", N, T, 1, 1, K, V, 1, "float16")
        store.put(torch.arange(N), torch.randn(N, T, 1, 1, K, generator=g),
                  torch.randn(N, T, 1, 1, V, generator=g),
                  torch.rand(N, T, 1, 1, generator=g) * 0.1 + 0.9)
        loader = data.StateLoader(store, range(N), 64, 256, device, seed=0)
        cfg = SAEConfig(d_k=K, d_v=V)
        sae = WriteSAE(cfg, seed=0).to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        tracker = DeadTracker(cfg, device=device)
        n_states = loader.steps * loader.batch

        def rebuild_only():
            for S in loader.epoch(0):
                pass

        def rebuild_and_train():
            for i, S in enumerate(loader.epoch(0)):
                train_step(sae, opt, S, i + 1, tracker, 1000)

        t = time_interleaved({"rebuild": rebuild_only, "train": rebuild_and_train}, device=device,
                             reps=max(1, reps // 2))
    rows += [("states/s rebuilt from fp16 factors (fp32 recurrence)",
              f"{n_states / t['rebuild']:,.0f}"),
             ("states/s end to end: factors -> rebuild -> write-SAE training step",
              f"{n_states / t['train']:,.0f}")]
    report("Factor store (K = V = 128)", rows)


# ---- eval (eval.py) ------------------------------------------------------------------------------

@bench("eval")
def bench_eval(device="cpu", reps=5, n_firings=12, T=256):
    """Substitution-test firings per second: eval.py's branch (one cache walked along each block,
    then batched forwards of the firing token for the 6 rows base + 5 conditions, in both
    readings) against re-running the full block once per row with that row's edit (one reading). Same firings, same substitutes,
    the demo GDN architecture at random init."""
    import eval as ev
    import writesae
    from demo import build as demo
    model = demo.build_model("gdn", 4096).to(device).eval()
    K, V = model.state_shape
    sae = writesae.WriteSAE(writesae.SAEConfig(d_k=K, d_v=V, n_feat=2048, k=32), seed=0).to(device)
    layer = model.write_layers[len(model.write_layers) // 2]
    site = ev.make_site(model, None, sae, 0, layer, 0, model.default_write)
    blocks = torch.randint(4096, (2, T), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        scans = [ev.scan_block(site, b) for b in blocks]
    g = torch.Generator().manual_seed(1)
    picked = sorted({(b, int(t)) for b in range(2)
                     for t in torch.randint(T - 1, (n_firings // 2,), generator=g)})  # t + 1 read

    def branched():  # both readings; the in-recurrence one (KL(base ‖ cond) at t) is compared
        kl = ev.firing_kls(site, blocks, scans, picked, torch.Generator().manual_seed(0))["kl"]
        return kl[:, 1, 0]                                        # [n,5]

    @torch.no_grad()
    def full():
        gen = torch.Generator().manual_seed(0)
        kls = []
        for b, t in picked:
            nat = ev.native(site, scans[b], t)
            subs = writesae.substitution_factors(site.dec_k, site.dec_v, scans[b]["codes"][t],
                                                 *nat, gen)
            rows = [[]] + [[ev.edit(site, t, "delete" if subs[c] is None else "replace", subs[c])]
                           for c in ev.CONDS]
            logits = torch.stack([model(blocks[b][None], edits=es).logits[0, t] for es in rows])
            lp = logits.float().log_softmax(-1)
            kls.append((lp[:1].exp() * (lp[:1] - lp[1:])).sum(-1))
        return torch.stack(kls)

    err = (branched() - full()).abs().max().item()
    t = time_interleaved({"branched": branched, "full": full}, device, reps)
    n = len(picked)
    report(f"eval: substitution firings/s (demo GDN, T = {T}, {n} firings × 6 rows, {device})", [
        ("branched from the cached prefix", f"{n / t['branched']:.2f} firings/s"),
        ("full block re-run per condition", f"{n / t['full']:.2f} firings/s"),
        ("speed-up", f"{t['full'] / t['branched']:.1f}×"),
        ("max |ΔKL| between the two", f"{err:.1e}")])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*",
                   help=f"benchmarks to run (default all): {', '.join(BENCHES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--heads", type=int, default=None,
                   help="heads in the paper-scale SAE step (sae): default 16 on CUDA, 2 on a CPU")
    args = p.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.names or BENCHES:
        fn = BENCHES[name]
        extra = {"heads": args.heads} if "heads" in inspect.signature(fn).parameters else {}
        fn(device=args.device, reps=args.reps, **extra)


if __name__ == "__main__":
    main()
