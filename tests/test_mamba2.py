"""models/mamba2.py against transformers' Mamba2ForCausalLM (pure-torch path), on tiny random checkpoints
written in both real layouts: raw mamba_ssm (config.json with d_model/ssm_cfg + pytorch_model.bin) and
HF-converted (model_type mamba2 + model.safetensors)."""

import json

import pytest
import torch
from helpers import assert_close, rel_err
from safetensors.torch import load_file, save_file

from models import hub, load_model
from models.common import Capture, Edit, scan_with_edits
from models.mamba2 import (Mamba2Config, chunked, from_pretrained, recurrent, save_pretrained,
                           step)

D_MODEL, N_LAYER, HEADS, P, N, VOCAB, PAD = 32, 2, 8, 8, 16, 100, 16   # raw vocab 100 is padded to 112


def tiny_hf(G: int, tie: bool, seed=0):
    """A transformers Mamba2ForCausalLM with every parameter random (A_log, dt_bias, D, norms, conv bias too)."""
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM as HFModel
    cfg = HFConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYER, vocab_size=-(-VOCAB // PAD) * PAD,
                   num_heads=HEADS, head_dim=P, state_size=N, n_groups=G, expand=2, conv_kernel=4, chunk_size=16,
                   tie_word_embeddings=tie, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = HFModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(-1.0, 1.5)
            elif name.endswith("dt_bias"):
                p.normal_(-1.0, 0.7)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.normal_(1.0, 0.2)
            elif p.dim() == 1:   # D, conv bias
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if p.dim() == 2 and "embed" not in name else 0.5)
    return model


def write_raw(hf, path, dtype=torch.float32):
    """The state-spaces/mamba2-* layout: mamba_ssm config (no model_type), pytorch_model.bin with
    backbone.embedding.weight and lm_head.weight (a second name of the embedding when tied)."""
    c = hf.config
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": VOCAB,
           "ssm_cfg": {"layer": "Mamba2", "d_state": N, "headdim": P, "ngroups": c.n_groups, "chunk_size": 16},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": PAD, "tie_embeddings": c.tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(cfg))
    sd = {n.replace("embeddings.", "embedding."): t.to(dtype) for n, t in hf.state_dict().items()}
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    torch.save(sd, path / "pytorch_model.bin")
    return path


def write_hf(hf, path):
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{G: (transformers model, ours from the raw layout, ours from the HF layout)}; G = 2 is untied."""
    out = {}
    for G, tie in ((1, True), (2, False)):
        hf = tiny_hf(G, tie, seed=G)
        raw = from_pretrained(write_raw(hf, tmp_path_factory.mktemp(f"raw{G}")), tokenizer=False)[0]
        conv = from_pretrained(write_hf(hf, tmp_path_factory.mktemp(f"hf{G}")), tokenizer=False)[0]
        out[G] = hf, raw, conv
    return out


def ids_(T=37, B=2, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("G", [1, 2], ids=["G1-tied", "G2-untied"])
@pytest.mark.parametrize("layout", [1, 2], ids=["raw", "hf"])
def test_logits_match_transformers(models, G, layout):
    hf, ours = models[G][0], models[G][layout]
    ids = ids_()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape == (2, 37, 112)
    assert_close("logits", ref, got, 1e-5)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    with torch.no_grad():
        assert_close("logits (recurrent)", ref, ours(ids, impl="recurrent").logits, 1e-5)


@pytest.mark.parametrize("G", [1, 2])
def test_final_states_match_transformers_cache(models, G):
    hf, ours = models[G][0], models[G][1]
    ids = ids_(T=21)
    with torch.no_grad():
        ref = hf(ids, use_cache=True).cache
        out = ours(ids, use_cache=True, capture=Capture(layers=(0, 1), states=True))
    for i in range(N_LAYER):
        S_ref = ref.get_recurrent_state(i).transpose(-1, -2)       # transformers [B,H,P,N] -> ours [B,H,N,P]
        assert_close(f"ssm state {i}", S_ref, out.cache.layers[i]["ssm"])
        assert_close(f"captured S_T {i}", S_ref, out.captures[i]["states"][:, -1])
        assert_close(f"conv state {i}", ref.get_conv_state(i)[..., 1:].transpose(1, 2), out.cache.layers[i]["conv"])


def test_fp16_raw_checkpoint(models, tmp_path):
    hf = models[1][0]
    ours16 = from_pretrained(write_raw(hf, tmp_path, torch.float16), tokenizer=False)[0]
    assert ours16.backbone.embeddings.weight.dtype == torch.float32   # upcast on load
    ids = ids_()
    with torch.no_grad():
        ref32 = hf(ids).logits
        for p in hf.parameters():  # the oracle on the same fp16-rounded weights
            p.copy_(p.half().float())
        ref16 = hf(ids).logits
        got = ours16(ids).logits
        for p, q in zip(hf.parameters(), tiny_hf(1, True, seed=1).parameters()):
            p.copy_(q)                                                  # restore the shared fixture
    assert_close("fp16 checkpoint vs oracle on rounded weights", ref16, got, 1e-5)
    assert_close("fp16 checkpoint vs fp32 (fp16 rounding)", ref32, got, 3e-3)


def scan_inputs(T, G=2, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = {"x": r(2, T, H, P), "dt": torch.nn.functional.softplus(r(2, T, H) - 1), "B": r(2, T, G, N),
              "C": r(2, T, G, N)}
    return inputs, {"A": -torch.rand(H, generator=g) * 2, "D": r(H)}, r(2, H, N, P)


@pytest.mark.parametrize("Q", [16, 64, 256])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_chunked_equals_recurrent(T, Q):
    inputs, kw, S0 = scan_inputs(T)
    y1, S1, w1 = recurrent(inputs, S0, **kw)
    y2, S2, w2 = chunked(inputs, S0, chunk_size=Q, **kw)
    assert_close("out", y1, y2)
    assert_close("final state", S1, S2)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_close(k, w1[k], w2[k])


def test_chunked_matches_recurrent_under_decay_below_exp_range_with_finite_gradients():
    """Segment sums below fp32's exp range (clamped at −87 by the chunked form): loop values and gradients."""
    inputs, kw, S0 = scan_inputs(70)
    kw["A"] = kw["A"] * torch.linspace(1, 200, kw["A"].shape[0])             # the last heads forget at once
    inputs = {n: x.requires_grad_() for n, x in inputs.items()}
    grads = []
    for scan in (recurrent, lambda x, S, **k: chunked(x, S, chunk_size=64, **k)):
        y, S, _ = scan(inputs, S0, **kw)
        grads.append(torch.autograd.grad((y ** 2).sum() + S.sum(), list(inputs.values())))
    for name, g_ref, g in zip(inputs, *grads):
        assert torch.isfinite(g).all(), name
        assert_close(f"grad {name}", g_ref, g)


def test_delete_equals_loop_without_that_write():
    inputs, kw, S0 = scan_inputs(40)
    t_e, h_e = 17, 3   # head 3 reads group 1
    y, S, _ = scan_with_edits(chunked, step, inputs, S0, [Edit(0, h_e, 100 + t_e, op="delete")], 100, "additive",
                              **kw)
    A, D = kw["A"], kw["D"]
    S_ref, ys = S0.clone(), []
    for t in range(40):  # hand-written SSD loop, written out again here
        x, dt = inputs["x"][:, t], inputs["dt"][:, t]                               # [B,H,P], [B,H]
        Bh, Ch = (inputs[n][:, t].repeat_interleave(2, dim=1) for n in "BC")         # [B,H,N]
        write = Bh[..., :, None] * (dt[..., None] * x)[..., None, :]
        if t == t_e:
            write[:, h_e] = 0
        S_ref = torch.exp(dt * A)[..., None, None] * S_ref + write
        ys.append((S_ref * Ch[..., None]).sum(-2) + D[:, None] * x)
    assert_close("out", torch.stack(ys, 1), y)
    assert_close("state", S_ref, S)


def test_prefill_decode_equals_full_forward(models):
    ours = models[2][1]
    ids = ids_(T=30)
    with torch.no_grad():
        full = ours(ids).logits
        res = ours(ids[:, :11], use_cache=True)
        kept, cache, parts = res.cache.copy(), res.cache, [res.logits]
        bounds = [11, 12, 13, 14, 20, 21, 22, 30]   # single tokens and chunks of 6 and 8 after the prefill
        for a, b in zip(bounds, bounds[1:]):
            res = ours(ids[:, a:b], cache=cache)
            parts.append(res.logits)
            cache = res.cache
        assert cache.pos == 30
    assert_close("prefill+decode", full, torch.cat(parts, 1))
    for a, b in zip(kept.layers, ours(ids[:, :11], use_cache=True).cache.layers):  # the given cache untouched
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_edits(models):
    ours = models[2][1]
    ids = ids_(T=24, B=1)
    layer, head, pos = 1, 5, 9
    with torch.no_grad():
        base = ours(ids, capture=Capture(layers=(layer,)))
        w = base.captures[layer]
        same = Edit(layer, head, pos, k=w["add_k"][0, pos, head], v=w["add_v"][0, pos, head])   # [1,N], [1,P]
        ident = ours(ids, edits=[same]).logits
        deleted = ours(ids, edits=[Edit(layer, head, pos, op="delete")]).logits
        decoded = ours(ids[:, pos:], cache=ours(ids[:, :pos], use_cache=True).cache,
                       edits=[Edit(layer, head, pos, op="delete")]).logits
    assert_close("identity edit", base.logits, ident, 1e-6)
    assert_close("before the edit", base.logits[:, :pos], deleted[:, :pos], 1e-6)
    assert rel_err(base.logits[:, pos:], deleted[:, pos:]) > 1e-4
    assert_close("delete after a cache", deleted[:, pos:], decoded, 1e-5)
    assert set(w) == {"add_k", "add_v", "inc_k", "inc_v", "decay", "query", "gain"}
    assert w["add_k"].shape == (1, 24, HEADS, 1, N) and w["add_v"].shape == (1, 24, HEADS, 1, P)
    assert w["decay"].shape == (1, 24, HEADS, 1) and w["query"].shape == (1, 24, HEADS, N)
    assert w["gain"].shape == (1, 24, HEADS, P)
    assert ours.head_out_proj(layer, head).shape == (D_MODEL, P)


def test_generate(models):
    ours = models[1][1]
    ids = ids_(T=6, B=2)
    out = ours.generate(ids, max_new_tokens=5)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], ids)
    with torch.no_grad():
        greedy = ours(out[:, :-1]).logits.argmax(-1)[:, 5:]
    assert torch.equal(greedy, out[:, 6:])


def test_save_pretrained_round_trip(models, tmp_path):
    from transformers import Mamba2ForCausalLM as HFModel
    ours = models[2][1]
    save_pretrained(ours, tmp_path, dtype=torch.float32)
    ids = ids_()
    with torch.no_grad():
        ref = ours(ids).logits
        assert_close("transformers reads our save", ref, HFModel.from_pretrained(tmp_path).eval()(ids).logits)
        assert_close("we read our save", ref, from_pretrained(tmp_path, tokenizer=False)[0](ids).logits)


def test_raw_config_defaults_are_mamba2s():
    cfg = Mamba2Config.from_hf({"d_model": 1024, "n_layer": 48, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
                                "pad_vocab_size_multiple": 16})
    assert (cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim, cfg.ngroups, cfg.chunk_size, cfg.eps) == \
        (128, 4, 2, 64, 1, 256, 1e-5)
    assert (cfg.n_heads, cfg.vocab_size, cfg.tie_embeddings) == (32, 50288, True)
    with pytest.raises(hub.CheckpointError, match="ssm_cfg layer 'Mamba1'"):
        Mamba2Config.from_hf({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {}})
    with pytest.raises(hub.CheckpointError, match="norm_before_gate"):
        Mamba2Config.from_hf({"d_model": 8, "n_layer": 1, "vocab_size": 8,
                              "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}})


def test_tokenizer(models, tmp_path, monkeypatch):
    """Raw repos ship no tokenizer: offline with an empty HF cache the model still loads (for callers passing
    ids), with a warning, and encoding text raises one line naming the default repo and the way out."""
    import huggingface_hub.constants as C
    from tokenizers import Tokenizer, models as tm
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    raw = write_raw(models[1][0], tmp_path / "raw")
    with pytest.warns(UserWarning, match="ships no tokenizer"):
        model, tok = load_model(raw)
    assert tok.vocab_size == 112 and tok.eos_id == 0 and model(ids_()).logits.shape == (2, 37, 112)
    with pytest.raises(hub.CheckpointError, match=r"EleutherAI/gpt-neox-20b.*tokenizer") as e:
        tok.encode("hello")
    assert "\n" not in str(e.value)
    Tokenizer(tm.WordLevel({"hello": 3, "[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tok.json"))
    assert load_model(raw, tokenizer=tmp_path / "tok.json")[1].encode("hello") == [3]
    with pytest.raises(hub.CheckpointError, match="nobody/none"):   # an explicit tokenizer= must work or raise
        load_model(raw, tokenizer="nobody/none")


def test_errors(models, tmp_path):
    hf, ours = models[1][0], models[1][1]
    good = write_hf(hf, tmp_path / "good")
    sd = load_file(str(good / "model.safetensors"))
    name = "backbone.layers.1.mixer.A_log"
    for case, edit in {"missing": lambda d: d.pop(name),
                       "unexpected": lambda d: d.__setitem__("backbone.layers.2.mixer.D", torch.zeros(HEADS)),
                       "has shape": lambda d: d.__setitem__(name, torch.zeros(HEADS + 1))}.items():
        bad = tmp_path / case.replace(" ", "_")
        bad.mkdir()
        (bad / "config.json").write_text((good / "config.json").read_text())
        d = dict(sd)
        edit(d)
        save_file(d, str(bad / "model.safetensors"))
        with pytest.raises(hub.CheckpointError, match=case):
            from_pretrained(bad, tokenizer=False)
    with pytest.raises(ValueError, match="layer 2 is not a Mamba-2 layer"):
        ours(ids_(), edits=[Edit(2, 0, 0, op="delete")])
    with pytest.raises(ValueError, match="head 8 is out of range"):
        ours(ids_(), capture=Capture(layers=(0,), heads=(8,)))
    with pytest.raises(ValueError, match="do not fit"):
        ours(ids_(), edits=[Edit(0, 0, 0, k=torch.zeros(1, P), v=torch.zeros(1, N))])
    with pytest.raises(ValueError, match="impl must be"):
        ours(ids_(), impl="fast")
