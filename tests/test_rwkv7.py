"""RWKV-7: our loader and forward against the `rwkv` package (BlinkDL's x070 code) on a tiny random .pth, the fla
layouts, the World tokenizer, chunked == recurrent, the rank-2 increment, edits, the decode cache and errors."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import assert_close, rel_err
from safetensors.torch import save_file

from models import rwkv7
from models.common import Capture, Edit, outer, scan_with_edits
from models.hub import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's torch.jit.script

C, H, N, LAYERS, VOCAB, FFN, RANKS = 128, 2, 64, 3, 256, 512, (16, 16, 8, 32)  # head size 64: the package's eps
T_REF = 70  # crosses a 64-token chunk boundary


def rwkv_package():
    assert os.environ.get("RWKV_V7_ON") == "1" and os.environ.get("RWKV_CUDA_ON") == "0"  # set by conftest
    import rwkv.model
    return rwkv.model


def vocab_file() -> Path:
    import importlib.util
    return Path(importlib.util.find_spec("rwkv").submodule_search_locations[0]) / rwkv7.WORLD_VOCAB


def blinkdl_state_dict(seed=0) -> dict:
    """Every parameter random, in BlinkDL's names, shapes and [1,1,C] vectors (v0/v1/v2 kept on block 0, unused)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"emb.weight": rnd(VOCAB, C), "blocks.0.ln0.weight": 1 + rnd(C, scale=.1), "blocks.0.ln0.bias": rnd(C, scale=.1)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2", "att.ln_x"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + rnd(C, scale=.2), rnd(C, scale=.2)
        for m in "rwkvag":
            sd[p + f"att.x_{m}"] = torch.rand(1, 1, C, generator=g)
        for m, D in zip("wavg", RANKS):
            if m != "g":
                sd[p + f"att.{m}0"] = rnd(1, 1, C, scale=.5)
            sd[p + f"att.{m}1"], sd[p + f"att.{m}2"] = rnd(C, D, scale=C ** -.5), rnd(D, C, scale=D ** -.5)
        sd[p + "att.k_k"], sd[p + "att.k_a"] = 1 + rnd(1, 1, C, scale=.3), 1 + rnd(1, 1, C, scale=.3)
        sd[p + "att.r_k"] = rnd(H, N, scale=.3)
        for n in ("receptance", "key", "value", "output"):
            sd[p + f"att.{n}.weight"] = rnd(C, C, scale=C ** -.5)
        sd[p + "ffn.x_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = rnd(FFN, C, scale=C ** -.5), rnd(C, FFN, scale=FFN ** -.5)
    sd["ln_out.weight"], sd["ln_out.bias"] = 1 + rnd(C, scale=.1), rnd(C, scale=.1)
    sd["head.weight"] = rnd(VOCAB, C, scale=C ** -.5)
    return sd


def to_fla(sd: dict, packed: bool) -> dict:
    """The BlinkDL key layout, written out independently of the loader's table."""
    out = {"model.embeddings.weight": sd["emb.weight"], "lm_head.weight": sd["head.weight"],
           "model.norm.weight": sd["ln_out.weight"], "model.norm.bias": sd["ln_out.bias"],
           "model.layers.0.pre_norm.weight": sd["blocks.0.ln0.weight"], "model.layers.0.pre_norm.bias": sd["blocks.0.ln0.bias"]}
    for i in range(LAYERS):
        b, f = f"blocks.{i}.", f"model.layers.{i}."
        for old, new in (("ln1", "attn_norm"), ("ln2", "ffn_norm"), ("att.ln_x", "attn.g_norm")):
            out[f + new + ".weight"], out[f + new + ".bias"] = sd[b + old + ".weight"], sd[b + old + ".bias"]
        for old, new in (("receptance", "r_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "o_proj")):
            out[f + f"attn.{new}.weight"] = sd[b + f"att.{old}.weight"]
        for m in ("w", "a", "v", "g"):
            if m == "v" and i == 0:
                continue
            out[f + f"attn.{m}_lora.lora.0.weight"] = sd[b + f"att.{m}1"].t().contiguous()
            out[f + f"attn.{m}_lora.lora.2.weight"] = sd[b + f"att.{m}2"].t().contiguous()
            if m != "g":
                out[f + f"attn.{m}_lora.lora.2.bias"] = sd[b + f"att.{m}0"].flatten()
        if packed:
            out[f + "attn.x_x"] = torch.stack([sd[b + f"att.x_{m}"] for m in "rwkvag"])  # [6,1,1,C]
        else:
            out.update({f + f"attn.x_{m}": sd[b + f"att.x_{m}"] for m in "rwkvag"})
        out[f + "attn.k_k"], out[f + "attn.k_a"] = sd[b + "att.k_k"].flatten(), sd[b + "att.k_a"].flatten()
        out[f + "attn.r_k"] = sd[b + "att.r_k"]
        out[f + "ffn.x_k"] = sd[b + "ffn.x_k"].flatten()
        out[f + "ffn.key.weight"], out[f + "ffn.value.weight"] = sd[b + "ffn.key.weight"], sd[b + "ffn.value.weight"]
    return out


FLA_CONFIG = dict(model_type="rwkv7", architectures=["RWKV7ForCausalLM"], hidden_size=C, num_hidden_layers=LAYERS,
                  head_dim=N, num_heads=H, vocab_size=VOCAB, intermediate_size=FFN, hidden_ratio=4,
                  decay_low_rank_dim=RANKS[0], a_low_rank_dim=RANKS[1], v_low_rank_dim=RANKS[2],
                  gate_low_rank_dim=RANKS[3], norm_eps=1e-5, tie_word_embeddings=False, attn=None,
                  value_dim=[C] * LAYERS, hidden_act="sqrelu", norm_first=True, norm_bias=True, fuse_norm=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machines are shared 2-core boxes: two OpenMP threads per process thrash; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rwkv7")
    torch.save(blinkdl_state_dict(), d / "tiny.pth")
    (d / rwkv7.WORLD_VOCAB).symlink_to(vocab_file())
    return d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (1, T_REF), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return rwkv7.from_pretrained(ckpt / "tiny.pth")


@pytest.fixture(scope="module")
def reference(ckpt, ids):
    package = rwkv_package().RWKV(model=str(ckpt / "tiny"), strategy="cpu fp32")
    logits, state = package.forward(ids[0].tolist(), None, full_output=True)
    return logits, state


def test_logits_and_states_match_rwkv_package(loaded, reference, ids):
    model, tok = loaded
    assert isinstance(tok, rwkv7.WorldTokenizer)
    ref_logits, ref_state = reference
    for impl in ("chunked", "recurrent"):
        out = model(ids, use_cache=True, impl=impl)
        assert_close(f"logits ({impl})", ref_logits, out.logits[0], 1e-5)
        assert torch.equal(ref_logits.argmax(-1), out.logits[0].argmax(-1))
        for i, layer in enumerate(out.cache.layers):
            assert_close(f"layer {i} att_x_prev", ref_state[3 * i], layer["attn_shift"][0], 1e-5)
            assert_close(f"layer {i} state", ref_state[3 * i + 1], layer["S"][0].transpose(-1, -2), 1e-5)  # BlinkDL [V,K]
            assert_close(f"layer {i} ffn_x_prev", ref_state[3 * i + 2], layer["ffn_shift"][0], 1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["split-x_r..x_g", "packed-x_x"])
def test_fla_layout_gives_the_same_logits(tmp_path, loaded, ids, packed):
    save_file(to_fla(blinkdl_state_dict(), packed), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(FLA_CONFIG))
    model, _ = rwkv7.from_pretrained(tmp_path, tokenizer=vocab_file())
    assert_close("fla vs .pth logits", loaded[0](ids).logits, model(ids).logits, 1e-6)


def test_save_pretrained_round_trip(tmp_path, loaded, ids):
    model = loaded[0]
    rwkv7.save_pretrained(model, tmp_path, dtype=torch.float32)
    assert set(json.loads((tmp_path / "config.json").read_text())) >= set(FLA_CONFIG)
    again, _ = rwkv7.from_pretrained(tmp_path, tokenizer=vocab_file())
    assert set(again.state_dict()) == set(to_fla(blinkdl_state_dict(), packed=False))
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_world_tokenizer_matches_trie_tokenizer():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    text = ("Hello world!  The year 2024 had 366 days;\n\n\tindented\r\n"
            "Ünïcödé: naïve café, 北京欢迎你, Привет, 🙂🚀 emoji, عربى — “quotes” …\n"
            "    code = {'a': [1, 2, 3]}  # 0x1F600\n" + "-" * 100 + " 3.14159 1,000,000 \x00\x7f end")
    ours, ref = rwkv7.WorldTokenizer(vocab_file()), TRIE_TOKENIZER(str(vocab_file()))
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert ours.vocab_size == 65530 and ours.decode([0]) == "<|endoftext|>"
    assert ours.decode([65531, 70000]) == "<id 65531><id 70000>"  # ids it lacks: placeholders


def test_tokenizer_json_beside_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "the": 1, "pile": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.save({}, tmp_path / "model.pth")
    loaded = rwkv7.load_tokenizer(tmp_path / "model.pth")
    assert loaded.encode("the pile") == [1, 2] and loaded.eos_id == 0


# --------------------------------------------------------------------------------------------------------
# The scan on its own

def scan_inputs(B, T, Hh, K, seed=0):
    """Inputs distributed like the model's: bounded log decay, unit erase direction κ̂, a_rate ∈ (0,1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kk = torch.nn.functional.normalize(rnd(B, T, Hh, K), dim=-1)
    a_rate = torch.sigmoid(rnd(B, T, Hh, K))
    w = -math.exp(-0.5) * torch.sigmoid(rnd(B, T, Hh, K) + 2)  # mostly fast decay: the factored form's worst case
    return dict(r=rnd(B, T, Hh, K), w=w, k=rnd(B, T, Hh, K) * 0.5, v=rnd(B, T, Hh, K), a=-kk, b=kk * a_rate)


@pytest.mark.parametrize("T", [1, 15, 16, 17, 63, 64, 65, 300], ids=lambda t: f"T{t}")
def test_chunked_equals_recurrent(T):
    inputs = scan_inputs(2, T, 2, 32)
    S0 = torch.randn(2, 2, 32, 32)
    o_ref, S_ref, w_ref = rwkv7.recurrent(inputs, S0)
    o, S, w = rwkv7.chunked(inputs, S0)
    assert_close("out", o_ref, o, 1e-5)
    assert_close("final state", S_ref, S, 1e-5)
    assert set(w) == set(w_ref)
    for name in w_ref:
        assert_close(name, w_ref[name], w[name], 1e-5)
    for L in (16, 64):
        o_L, S_L, _ = rwkv7.chunked(inputs, S0, chunk_size=L)
        assert_close(f"out, chunk {L}", o_ref, o_L, 1e-5)
        assert_close(f"state, chunk {L}", S_ref, S_L, 1e-5)


def test_chunked_gradients_match_recurrent():
    inputs = {n: x.requires_grad_() for n, x in scan_inputs(1, 40, 2, 16, seed=3).items()}
    grads = []
    for scan in (rwkv7.recurrent, lambda x: rwkv7.chunked(x, chunk_size=16)):
        o, S, _ = scan(inputs)
        grads.append(torch.autograd.grad((o ** 2).sum() + S.sum(), list(inputs.values())))
    for name, g_ref, g in zip(inputs, *grads):
        assert_close(f"grad {name}", g_ref, g, 1e-5)


def test_increment_is_rank_two_and_rebuilds_the_state():
    inputs = scan_inputs(1, 12, 2, 16, seed=1)
    S0 = torch.randn(1, 2, 16, 16)
    _, _, w = rwkv7.recurrent(inputs, S0, keep_states=True)
    S = w["states"]                                                              # [B,T,H,K,V]
    prev = torch.cat([S0[:, None], S[:, :-1]], 1)
    inc = outer(w["inc_k"], w["inc_v"])
    assert_close("increment", S - w["decay"][..., None] * prev, inc, 1e-6)
    rank_inc, rank_add = rank(outer(w["inc_k"].double(), w["inc_v"].double())), rank(outer(w["add_k"].double(), w["add_v"].double()))
    assert (rank_inc <= 2).all() and (rank_inc == 2).any()  # the erase is live
    assert (rank_add == 1).all()


def rank(m):  # numerical rank of [..., K, V] (torch.linalg.matrix_rank mis-counts 5-D batches in torch 2.13)
    s = torch.linalg.svdvals(m.double().flatten(0, -3))
    return (s > 1e-10 * s[:, :1]).sum(-1)


def test_delete_equals_hand_loop_without_that_write():
    inputs, S0, p, h = scan_inputs(1, 30, 2, 16, seed=2), torch.randn(1, 2, 16, 16), 11, 1
    o, S, _ = scan_with_edits(rwkv7.chunked, rwkv7.step, inputs, S0, [Edit(0, h, p, "delete")], 0, "increment")
    outs, state = [], S0
    for t in range(30):  # the recurrence by hand; at (p, h) the decay is applied and nothing written
        r, w, k, v, a, b = (inputs[n][:, t] for n in "rwkvab")
        u = torch.einsum("bhk,bhkv->bhv", a, state)
        new = w.exp()[..., None] * state + b[..., None] * u[..., None, :] + k[..., None] * v[..., None, :]
        if t == p:
            new[:, h] = w.exp()[:, h, :, None] * state[:, h]
        state = new
        outs.append(torch.einsum("bhk,bhkv->bhv", r, state))
    assert_close("out", torch.stack(outs, 1), o, 1e-5)
    assert_close("state", state, S, 1e-5)


# --------------------------------------------------------------------------------------------------------
# The model surface: edits, capture, cache, generate, errors

def test_identity_edit_and_delete_on_the_model(loaded, ids):
    model = loaded[0]
    base = model(ids, capture=Capture(layers=(1,), heads=(1,)))
    inc_k, inc_v = base.captures[1]["inc_k"][0, 20, 0], base.captures[1]["inc_v"][0, 20, 0]  # [2,K], [2,V]
    same = model(ids, edits=[Edit(1, 1, 20, "replace", inc_k, inc_v)])
    assert_close("identity edit", base.logits, same.logits, 1e-6)
    gone = model(ids, edits=[Edit(1, 1, 20, "delete")])
    assert torch.equal(gone.logits[:, :20], base.logits[:, :20])
    assert rel_err(base.logits[:, 20:], gone.logits[:, 20:]) > 1e-4


def test_capture_states_and_stop_after(loaded, ids):
    model = loaded[0]
    out = model(ids, use_cache=True, capture=Capture(layers=(0, 2), heads=(1,), states=True))
    cap = out.captures[2]
    assert cap["inc_k"].shape == (1, T_REF, 1, 2, N) and cap["gain"].shape == (1, T_REF, 1, N)
    assert_close("captured final state", out.cache.layers[2]["S"][:, 1:], cap["states"][:, -1], 1e-5)
    early = model(ids, capture=Capture(layers=(1,), stop_after=True))
    assert early.logits is None and torch.equal(early.captures[1]["query"], model(ids, capture=Capture((1,))).captures[1]["query"])


def test_prefill_then_decode_equals_full_forward(loaded, ids):
    model = loaded[0]
    full = model(ids).logits
    res = model(ids[:, :40], use_cache=True)
    snapshot = res.cache.copy()
    parts = [res.logits]
    for t in range(40, 45):
        res = model(ids[:, t:t + 1], cache=res.cache)
        parts.append(res.logits)
    parts.append(model(ids[:, 45:], cache=res.cache).logits)
    assert_close("prefill + decode", full, torch.cat(parts, 1), 1e-5)
    again = model(ids[:, 40:41], cache=snapshot)  # the cache given is never mutated
    assert torch.equal(again.logits, parts[1]) and res.cache.pos == 45


def test_generate_greedy(loaded, ids):
    model = loaded[0]
    out = model.generate(ids[:, :10], max_new_tokens=6)
    seq = ids[:, :10]
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_errors(ckpt, loaded, ids, tmp_path):
    model = loaded[0]
    with pytest.raises(ValueError, match="layer 3 is not a RWKV-7 layer"):
        model(ids, edits=[Edit(3, 0, 0, "delete")])
    with pytest.raises(ValueError, match="head 2 is out of range"):
        model(ids, capture=Capture(layers=(0,), heads=(2,)))
    with pytest.raises(ValueError, match="do not fit"):
        model(ids, edits=[Edit(0, 0, 0, "add", torch.randn(1, N + 1), torch.randn(1, N))])
    with pytest.raises(ValueError, match="outside this forward"):
        model(ids, edits=[Edit(0, 0, T_REF, "delete")])
    with pytest.raises(ValueError, match="impl must be"):
        model(ids, impl="fused")
    sd = blinkdl_state_dict()
    cases = [("blocks.1.att.k_a", None, "missing tensor 'model.layers.1.attn.k_a'"),
             ("blocks.0.att.bogus", torch.zeros(3), "unexpected tensor 'model.layers.0.attn.bogus'"),
             ("blocks.2.att.key.weight", torch.zeros(C, C + 1), "tensor 'model.layers.2.attn.k_proj.weight' has shape")]
    for name, value, message in cases:
        bad = dict(sd)
        bad.pop(name) if value is None else bad.__setitem__(name, value)
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=message):
            rwkv7.from_pretrained(tmp_path / "bad.pth", tokenizer=vocab_file())
    fla = to_fla(sd, packed=True)
    fla["model.layers.1.attn.x_x"] = fla["model.layers.1.attn.x_x"][:5]
    (tmp_path / "fla").mkdir()
    save_file(fla, str(tmp_path / "fla" / "model.safetensors"))
    (tmp_path / "fla" / "config.json").write_text(json.dumps(FLA_CONFIG))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.attn.x_x' has shape \[5, 1, 1, 128\]"):
        rwkv7.from_pretrained(tmp_path / "fla", tokenizer=vocab_file())
    with pytest.raises(CheckpointError, match="no rwkv_vocab_v20230424.txt or tokenizer.json"):
        rwkv7.load_tokenizer(tmp_path / "fla")
