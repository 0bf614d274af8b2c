"""models/qwen35.py against transformers' Qwen3_5ForCausalLM (pure-torch path, fla blocked in conftest), and the
write / edit / cache machinery against hand-written loops. Every checkpoint is a tiny random model written to
tmp_path by transformers' own save_pretrained and read back through models.load_model."""

import pytest
import torch
from helpers import assert_close

import models
from models import qwen35
from models.common import Capture, Edit, outer, rebuild_states, scan_with_edits

# Config A: Hv = Hk, K = V, tied head, attention in the middle. Config B: Hv = 2·Hk, K ≠ V, untied, L L L F.
CONFIGS = {
    "tied-Hv=Hk": dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, tie_word_embeddings=True,
                       layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "Hv=2Hk-K!=V": dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                        linear_value_head_dim=6, tie_word_embeddings=False,
                        layer_types=["linear_attention"] * 3 + ["full_attention"]),
}


def tf_model(name, seed=0):
    """A transformers Qwen3_5ForCausalLM with every parameter random (norm offsets, A_log, dt_bias included)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    kw = CONFIGS[name]
    cfg = Qwen3_5TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=len(kw["layer_types"]),
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=3,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
                            **kw)
    torch.manual_seed(seed)
    m = Qwen3_5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(-1, 1.5))
            elif n.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:  # zero-centred norm offsets and dt_bias
                p.copy_(0.3 * torch.randn_like(p))
            elif n.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5 * (2 if "conv1d" in n else 1))
    return m


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from transformers' save_pretrained directory)."""
    ref = tf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    ours, tok = models.load_model(path)
    assert isinstance(ours, qwen35.Qwen35ForCausalLM) and ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    return ref, ours


def ids_for(model, B=2, T=70, seed=1):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def rand_inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"q": qwen35.l2norm(r(B, T, H, K)) * K ** -0.5, "k": qwen35.l2norm(r(B, T, H, K)), "v": r(B, T, H, V),
            "g": -r(B, T, H).exp() * torch.nn.functional.softplus(r(B, T, H)), "beta": torch.sigmoid(r(B, T, H))}


# ---- parity with transformers ------------------------------------------------------------------------------

@torch.no_grad()
def test_logits_and_final_states_match_transformers(pair):
    ref, ours = pair
    ids = ids_for(ours)
    want = ref(ids, use_cache=True)
    got = ours(ids, use_cache=True)
    assert_close("logits", want.logits, got.logits, 1e-5)
    assert torch.equal(want.logits.argmax(-1), got.logits.argmax(-1))
    for i in ours.write_layers:
        assert_close(f"GDN state {i}", want.past_key_values.get_recurrent_state(i), got.cache.layers[i]["state"], 1e-5)
    got_rec = ours(ids, impl="recurrent").logits
    assert_close("logits (recurrent)", want.logits, got_rec, 1e-5)


@torch.no_grad()
def test_our_save_pretrained_round_trips_and_transformers_reads_it(pair, tmp_path):
    from transformers import Qwen3_5ForCausalLM
    ref, ours = pair
    qwen35.save_pretrained(ours, tmp_path, dtype=torch.float32)
    back, _ = models.load_model(tmp_path)
    ids = ids_for(ours, T=20)
    assert torch.equal(back(ids).logits, ours(ids).logits)
    assert_close("transformers reads ours", ref(ids).logits, Qwen3_5ForCausalLM.from_pretrained(tmp_path)(ids).logits)


# ---- the scan: loop, chunks, states, edits -----------------------------------------------------------------

@pytest.mark.parametrize("T,H", [(1, 3), (63, 3), (64, 3), (65, 3), (200, 3), (128, 1)], ids=lambda x: str(x))
def test_chunked_equals_recurrent(T, H):
    """... and leaves its inputs alone (one head, whole chunks: the chunk views could alias the caller's v)."""
    B, K, V = 2, 16, 8
    inputs = rand_inputs(B, T, H, K, V, seed=T)
    S0 = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(7))
    o1, s1, w1 = qwen35.recurrent(inputs, S0)
    before = {n: x.clone() for n, x in inputs.items()}
    o2, s2, w2 = qwen35.chunked(inputs, S0)
    assert all(torch.equal(before[n], inputs[n]) for n in inputs)
    assert_close("out", o1, o2)
    assert_close("final state", s1, s2)
    assert w1.keys() == w2.keys() == {"add_k", "add_v", "inc_k", "inc_v", "decay", "query", "beta"}
    for n in w1:
        assert_close(n, w1[n], w2[n])


def test_chunked_matches_recurrent_under_decay_below_exp_range_with_finite_gradients():
    """Decays whose sums inside a chunk leave fp32's exp range (a head that forgets within a few tokens): the
    chunked form clamps those sums at −87 and must still equal the loop, gradients included, with no inf or nan."""
    B, T, H, K, V = 1, 70, 2, 8, 6
    inputs = rand_inputs(B, T, H, K, V, seed=5)
    inputs["g"] = inputs["g"] * torch.tensor([1.0, 40.0])                     # head 1: ~−40 a token
    inputs = {n: x.requires_grad_() for n, x in inputs.items()}
    outs, grads = [], []
    for scan in (qwen35.recurrent, qwen35.chunked):
        o, S, _ = scan(inputs)
        outs.append(o.detach())
        grads.append(torch.autograd.grad((o ** 2).sum() + S.sum(), list(inputs.values())))
    assert_close("out", *outs)
    for name, g_ref, g in zip(inputs, *grads):
        assert torch.isfinite(g).all(), name
        assert_close(f"grad {name}", g_ref, g)


def test_loop_states_equal_states_rebuilt_from_exposed_increments():
    B, T, H, K, V = 2, 90, 2, 8, 6
    inputs = rand_inputs(B, T, H, K, V, seed=3)
    S0 = torch.randn(B, H, K, V)
    _, final, w = qwen35.recurrent(inputs, S0, keep_states=True)
    _, _, wc = qwen35.chunked(inputs, S0)
    assert_close("states", w["states"], rebuild_states(wc["inc_k"], wc["inc_v"], wc["decay"], S0))
    assert_close("last state", final, w["states"][:, -1])
    # the increment k δᵀ is the additive write β k vᵀ plus the delta rule's erase −β k kᵀ (α S_{t−1})
    prev = torch.cat([S0[:, None], w["states"][:, :-1]], 1) * w["decay"][..., None]
    erase = -inputs["beta"][..., None, None] * inputs["k"][..., None] * torch.einsum("bthkv,bthk->bthv", prev, inputs["k"])[..., None, :]
    assert_close("increment = additive + erase", outer(w["inc_k"], w["inc_v"]), outer(w["add_k"], w["add_v"]) + erase)


def hand_loop(inputs, S, skip=None):
    """The delta rule written out again, independent of qwen35.step; skip = (head, t): remove β k vᵀ there."""
    q, k, v, g, beta = (inputs[n] for n in ("q", "k", "v", "g", "beta"))
    outs = []
    for t in range(k.shape[1]):
        S = g[:, t, :, None, None].exp() * S
        S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * (v[:, t] - (S * k[:, t, :, :, None]).sum(2))[:, :, None]
        if skip is not None and skip[1] == t:
            h = skip[0]
            S = S.clone()
            S[:, h] -= beta[:, t, h, None, None] * k[:, t, h, :, None] * v[:, t, h, None, :]
        outs.append((S * q[:, t, :, :, None]).sum(2))
    return torch.stack(outs, 1), S


def test_delete_equals_loop_without_that_write():
    B, T, H, K, V = 2, 150, 3, 8, 8
    inputs, S0 = rand_inputs(B, T, H, K, V, seed=5), torch.randn(B, H, K, V)
    o, S, _ = scan_with_edits(qwen35.chunked, qwen35.step, inputs, S0, [Edit(0, 1, 100, "delete")], 30, "additive")
    o_ref, S_ref = hand_loop(inputs, S0, skip=(1, 70))
    assert_close("out", o_ref, o)
    assert_close("final state", S_ref, S)
    assert (hand_loop(inputs, S0)[0] - o_ref).abs().max() > 1e-3  # the deleted write mattered


@torch.no_grad()
def test_model_delete_equals_model_run_on_the_hand_loop(pair, monkeypatch):
    _, ours = pair
    ids = ids_for(ours, T=40)
    layer, head, pos = ours.write_layers[-1], ours.n_heads - 1, 25
    got = ours(ids, edits=[Edit(layer, head, pos, "delete")]).logits
    calls = []

    def loop(inputs, state=None):  # the model's scans in layer order; only the target layer loses the write
        calls.append(1)
        target = len(calls) == len(ours.write_layers)
        B, T, H, K = inputs["k"].shape
        S0 = state if state is not None else torch.zeros(B, H, K, inputs["v"].shape[-1])
        o, S = hand_loop(inputs, S0, skip=(head, pos) if target else None)
        return o, S, {}

    monkeypatch.setitem(qwen35.SCANS, "recurrent", loop)
    want = ours(ids, impl="recurrent").logits
    assert_close("logits", want, got)
    assert (ours(ids).logits - got)[:, pos:].abs().max() > 1e-4


@torch.no_grad()
def test_replace_by_itself_changes_nothing(pair):
    _, ours = pair
    ids = ids_for(ours, T=40)
    layer = ours.write_layers[0]
    base = ours(ids, capture=Capture((layer,)))
    w = base.captures[layer]
    for write, kind in (("additive", "add"), ("increment", "inc")):
        edits = [Edit(layer, 1, 17, "replace", w[f"{kind}_k"][0, 17, 1], w[f"{kind}_v"][0, 17, 1], write=write, batch=0)]
        # fp32 rounding only: the edited run splits the chunked scan at the edit (measured ~1e-6)
        assert_close(f"logits ({write})", base.logits, ours(ids, edits=edits).logits, 1e-5)
    other = [Edit(layer, 1, 17, "replace", w["add_k"][1, 17, 1], w["add_v"][1, 17, 1], batch=0)]  # row 1's write
    assert (ours(ids, edits=other).logits - base.logits)[0, 17:].abs().max() > 1e-4


# ---- capture, decode cache, generate -----------------------------------------------------------------------

@torch.no_grad()
def test_capture_heads_states_and_stop_after(pair):
    _, ours = pair
    ids = ids_for(ours, T=30)
    layer = ours.write_layers[0]
    full = ours(ids, use_cache=True, capture=Capture((layer,), heads=(1,), states=True))
    w = full.captures[layer]
    K, V = ours.state_shape
    assert w["add_k"].shape == (2, 30, 1, 1, K) and w["inc_v"].shape == (2, 30, 1, 1, V)
    assert w["gain"].shape == (2, 30, 1, V) and w["decay"].shape == (2, 30, 1, 1) and w["beta"].shape == (2, 30, 1)
    assert_close("last captured state", full.cache.layers[layer]["state"][:, 1:2], w["states"][:, -1])
    stopped = ours(ids, capture=Capture((layer,), stop_after=True))
    assert stopped.logits is None and torch.equal(stopped.captures[layer]["inc_v"][:, :, 1:2], w["inc_v"])
    # gain ⊙ o is what out_proj reads: its columns for head h times gain ⊙ (S_tᵀ q̃_t) give that head's output
    o = torch.einsum("bthkv,bthk->bthv", w["states"], w["query"])
    assert layer == 0  # layer 0 reads the embeddings, so its out_proj input is checkable directly
    attn = ours.model.layers[0].linear_attn
    x = ours.model.layers[0].input_layernorm(ours.model.embed_tokens(ids))
    inputs, _ = attn.scan_inputs(x, {})
    o_all, _, _ = qwen35.chunked(inputs)
    y, _ = attn.norm(o_all, attn.in_proj_z(x).view(*o_all.shape))
    assert_close("gain ⊙ o", y[:, :, 1:2], w["gain"] * o)
    assert torch.equal(ours.head_out_proj(0, 1), attn.out_proj.weight[:, V:2 * V])


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward_and_cache_is_not_mutated(pair):
    _, ours = pair
    ids = ids_for(ours, T=75)
    full = ours(ids).logits
    res = ours(ids[:, :66], use_cache=True)
    logits = [res.logits]
    for t in range(66, 75):
        before = res.cache.copy()
        nxt = ours(ids[:, t:t + 1], cache=res.cache)
        assert all(torch.equal(a, b) for la, lb in zip(before.layers, res.cache.layers) for a, b in zip(la.values(), lb.values()))
        assert nxt.cache.pos == t + 1 and res.cache.pos == t
        logits.append(nxt.logits)
        res = nxt
    assert_close("decode logits", full, torch.cat(logits, 1))
    greedy = ids[:, :10]
    for _ in range(6):
        greedy = torch.cat([greedy, ours(greedy).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(ours.generate(ids[:, :10], 6), greedy)
    sampled = ours.generate(ids[:, :10], 6, temperature=1.0, top_k=5, seed=0)
    assert sampled.shape == (2, 16) and torch.equal(sampled, ours.generate(ids[:, :10], 6, temperature=1.0, top_k=5, seed=0))


@torch.no_grad()
def test_logits_last_and_none_keep_the_cache(pair):
    _, ours = pair
    ids = ids_for(ours, T=20)
    full = ours(ids, use_cache=True)
    last, none = ours(ids, use_cache=True, logits="last"), ours(ids, use_cache=True, logits="none")
    assert_close("last-position logits", full.logits[:, -1:], last.logits)
    assert none.logits is None
    for a, b in zip(full.cache.layers, none.cache.layers):
        assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="logits must be"):
        ours(ids, logits="first")


@torch.no_grad()
def test_edits_during_decoding_equal_the_edited_full_forward(pair):
    _, ours = pair
    ids = ids_for(ours, T=12)
    layer, (K, V) = ours.write_layers[-1], ours.state_shape
    gen = torch.Generator().manual_seed(4)
    edit = Edit(layer, 0, 14, "add", 3 * torch.randn(1, K, generator=gen), 3 * torch.randn(1, V, generator=gen))
    out = ours.generate(ids, 6, edits=[edit])                         # position 14 is the 3rd decoded token
    want = ours(out[:, :-1], edits=[edit]).logits                      # the same sequence in one edited forward
    assert torch.equal(want[:, 11:].argmax(-1), out[:, 12:])
    assert (want - ours(out[:, :-1]).logits)[:, 14:].abs().max() > 1e-3  # the edit did something
    # token-by-token with the edit applied when its position passes, and with a cache given to generate()
    res = ours(out[:, :13], use_cache=True)
    before = res.cache.copy()
    step = ours(out[:, 13:16], cache=res.cache, edits=[edit])
    assert_close("edited decode", want[:, 13:16], step.logits)
    assert all(torch.equal(a, b) for la, lb in zip(before.layers, res.cache.layers) for a, b in zip(la.values(), lb.values()))
    assert torch.equal(ours.generate(out[:, 13:14], 4, edits=[edit], cache=res.cache), out[:, 13:18])


# ---- errors ------------------------------------------------------------------------------------------------

def test_site_errors_name_the_existing_layers_and_heads(pair):
    _, ours = pair
    ids = ids_for(ours, T=5)
    attn_layer = next(i for i in range(len(ours.model.layers)) if i not in ours.write_layers)
    layers = str(list(ours.write_layers))
    with pytest.raises(ValueError, match=rf"layer {attn_layer} is not a Gated DeltaNet layer.*{layers}"):
        ours(ids, capture=Capture((attn_layer,)))
    with pytest.raises(ValueError, match=rf"not a Gated DeltaNet layer.*{layers}"):
        ours(ids, edits=[Edit(attn_layer, 0, 1, "delete")])
    with pytest.raises(ValueError, match=rf"head {ours.n_heads} is out of range.*heads 0..{ours.n_heads - 1}"):
        ours(ids, edits=[Edit(ours.write_layers[0], ours.n_heads, 1, "delete")])
    with pytest.raises(ValueError, match="head -1 is out of range"):
        ours.head_out_proj(ours.write_layers[0], -1)
    with pytest.raises(ValueError, match="outside this forward's positions 0..4"):
        ours(ids, edits=[Edit(ours.write_layers[0], 0, 5, "delete")])
    K, V = ours.state_shape
    with pytest.raises(ValueError, match="do not fit"):
        ours(ids, edits=[Edit(ours.write_layers[0], 0, 1, "add", torch.zeros(1, K + 1), torch.zeros(1, V))])
    with pytest.raises(ValueError, match="impl must be one of"):
        ours(ids, impl="parallel")
    with pytest.raises(ValueError, match="capture.states with an edit"):
        ours(ids, edits=[Edit(ours.write_layers[0], 0, 1, "delete")], capture=Capture((ours.write_layers[0],), states=True))


def test_random_init_trains_through_the_chunked_path():
    cfg = qwen35.Qwen35Config(vocab_size=50, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=8, linear_num_key_heads=1, linear_num_value_heads=2,
                              linear_key_head_dim=8, linear_value_head_dim=4)
    m = qwen35.Qwen35ForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 70))
    loss = torch.nn.functional.cross_entropy(m(ids).logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.model.layers[0].linear_attn.A_log.grad.abs().sum() > 0


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_matches_cpu(pair):
    _, ours = pair
    ids = ids_for(ours, T=130)
    cpu = ours(ids, use_cache=True)
    gpu_model = qwen35.Qwen35ForCausalLM(ours.config).cuda().eval()
    gpu_model.load_state_dict(ours.state_dict())
    gpu = gpu_model(ids.cuda(), use_cache=True)
    assert_close("cuda logits", cpu.logits, gpu.logits.cpu(), 1e-4)
    inputs = rand_inputs(1, 200, 2, 16, 16)
    inputs = {n: x.cuda() for n, x in inputs.items()}
    assert_close("cuda chunked vs recurrent", qwen35.recurrent(inputs)[0], qwen35.chunked(inputs)[0], 1e-4)
