"""The architecture-independent pieces of models/common.py."""

import pytest
import torch
from helpers import assert_close

from models.common import (Cache, Capture, Edit, apply_edits, causal_conv, outer, rebuild_states,
                           scan_with_edits)


def test_edit_validation():
    k, v = torch.randn(1, 4), torch.randn(1, 3)
    with pytest.raises(ValueError, match="op must be"):
        Edit(0, 0, 0, op="swap", k=k, v=v)
    with pytest.raises(ValueError, match="needs k and v"):
        Edit(0, 0, 0, op="add")
    with pytest.raises(ValueError, match="needs no k, v"):
        Edit(0, 0, 0, op="delete", k=k, v=v)
    with pytest.raises(ValueError, match="write must be"):
        Edit(0, 0, 0, op="delete", write="both")


def test_cache_copies_are_independent():
    c = Cache(5, [{"state": torch.zeros(2, 3)}])
    d = c.copy()
    d.layers[0]["state"] += 1
    assert c.layers[0]["state"].abs().sum() == 0
    r = Cache(5, [{"state": torch.arange(2.0)[:, None].expand(2, 3).clone()}]).repeat(3)
    assert r.layers[0]["state"][:, 0].tolist() == [0, 0, 0, 1, 1, 1] and r.pos == 5
    s = r.select([4])
    s.layers[0]["state"] += 1
    assert r.layers[0]["state"][4, 0] == 1 and s.layers[0]["state"][0, 0] == 2


def test_apply_edits_replace_add_delete_on_one_row_and_head():
    B, H, K, V = 2, 3, 4, 5
    S = torch.randn(B, H, K, V)
    w = {"add_k": torch.randn(B, H, 1, K), "add_v": torch.randn(B, H, 1, V),
         "inc_k": torch.randn(B, H, 2, K), "inc_v": torch.randn(B, H, 2, V)}
    x_k, x_v = torch.randn(1, K), torch.randn(1, V)
    out = apply_edits(S, w, [Edit(0, 1, 0, "replace", x_k, x_v, batch=1)], "additive")
    want = S.clone()
    want[1, 1] += -outer(w["add_k"][1, 1], w["add_v"][1, 1]) + outer(x_k, x_v)
    torch.testing.assert_close(out, want)
    out = apply_edits(S, w, [Edit(0, 2, 0, "delete", write="increment")], "additive")
    want = S.clone()
    want[:, 2] -= outer(w["inc_k"][:, 2], w["inc_v"][:, 2])
    torch.testing.assert_close(out, want)
    assert torch.equal(apply_edits(S, w, [], "additive"), S)



def _step(S, x, edit_fn=None):
    """A toy recurrence of the contract's shape: S_t = d_t S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t."""
    S = x["decay"][..., None] * S + outer(x["inc_k"], x["inc_v"])
    w = {k: x[k] for k in ("inc_k", "inc_v", "decay")} | {"add_k": x["inc_k"], "add_v": x["inc_v"]}
    if edit_fn is not None:
        S = edit_fn(S, w)
    return S, torch.einsum("bhkv,bhk->bhv", S, x["q"]), w


def _loop(inputs, S):
    outs, ws = [], []
    for t in range(inputs["q"].shape[1]):
        S, o, w = _step(S, {k: x[:, t] for k, x in inputs.items()})
        outs.append(o), ws.append(w)
    return torch.stack(outs, 1), S, {k: torch.stack([w[k] for w in ws], 1) for k in ws[0]}


def test_scan_with_edits_and_rebuild():
    torch.manual_seed(0)
    B, T, H, K, V = 2, 9, 2, 3, 4
    inputs = {"q": torch.randn(B, T, H, K), "inc_k": torch.randn(B, T, H, 1, K),
              "inc_v": torch.randn(B, T, H, 1, V), "decay": torch.rand(B, T, H, 1)}
    S0 = torch.randn(B, H, K, V)
    out, S, w = scan_with_edits(_loop, _step, inputs, S0, [], t0=10, default_write="additive")
    ref, S_ref, _ = _loop(inputs, S0)
    torch.testing.assert_close(out, ref)
    states = rebuild_states(w["inc_k"], w["inc_v"], w["decay"], S0)
    torch.testing.assert_close(states[:, -1], S_ref)
    # deleting the write at absolute position 14 (= t 4) equals the loop with that write zeroed
    out_e, S_e, _ = scan_with_edits(_loop, _step, inputs, S0, [Edit(0, 1, 14, "delete")], 10, "additive")
    cut = {k: x.clone() for k, x in inputs.items()}
    cut["inc_k"][:, 4, 1] = 0
    ref_e, S_ref_e, _ = _loop(cut, S0)
    torch.testing.assert_close(out_e, ref_e)
    torch.testing.assert_close(S_e, S_ref_e)
    with pytest.raises(ValueError, match="outside this forward"):
        scan_with_edits(_loop, _step, inputs, S0, [Edit(0, 1, 3, "delete")], 10, "additive")


def test_causal_conv_equals_conv1d_and_carries_its_window_across_calls():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 9, 5, generator=gen), torch.randn(5, 1, 4, generator=gen), torch.randn(5, generator=gen)
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), w, b, groups=5)
    got, last = causal_conv(x, w, b)
    assert_close("one call", want.transpose(1, 2), got, 1e-6)
    assert torch.equal(last, x[:, -3:])
    parts, prev = [], None
    for a, e in ((0, 2), (2, 3), (3, 9)):  # shorter than the window, one token (a decode step), the rest
        y, prev = causal_conv(x[:, a:e], w, b, prev)
        parts.append(y)
    assert_close("in pieces", got, torch.cat(parts, 1), 1e-6)


# ----------------------------------------------------------------------------------------------
# The model-level forward (WriteModel.forward) and what each model owns, on tiny models

TINY = {
    "gdn": dict(hidden_size=16, intermediate_size=24, head_dim=8, num_attention_heads=2,
                num_key_value_heads=1, layer_types=("linear_attention", "full_attention"),
                linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=8,
                linear_value_head_dim=4),
    "mamba2": dict(d_model=16, n_layer=2, d_state=8, headdim=8),
    "rwkv7": dict(hidden_size=16, num_hidden_layers=2, head_dim=8, intermediate_size=32,
                  decay_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=8),
}


@pytest.mark.parametrize("arch", list(TINY))
def test_shared_forward_checks_and_final_norm(arch):
    """One layer loop for all three: the same input checks (the empty-capture guard included), the
    logits are the final_norm's output times lm_head_weight, and the default SAE rank is the default
    write's rank."""
    from demo.build import build_model
    model = build_model(arch, 40, seed=0, **TINY[arch]).eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = []
    hook = model.final_norm.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        logits = model(ids).logits
    hook.remove()
    head = torch.nn.functional.linear(seen[0], model.lm_head_weight())
    assert_close("logits", head, logits, 1e-6)
    with torch.no_grad():  # an empty capture with stop_after runs the whole model
        torch.testing.assert_close(model(ids, capture=Capture((), stop_after=True)).logits, logits)
        cache = model(ids[:, :3], use_cache=True).cache
    with pytest.raises(ValueError, match="ids must be a"):
        model(ids.float())
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model(ids, cache=Cache(3, cache.layers[:1]))
    with pytest.raises(ValueError, match="impl must be one of"):
        model(ids, impl="fused")
    assert model.sae_rank == model.write_rank[model.default_write] == (2 if arch == "rwkv7" else 1)
    assert model.READ_PATH and model.head_norm_eps > 0


def test_paper_figures_override_keys_of_the_main_figures():
    """Each model's PAPER_FIGURES replaces rows the report already has (eval.PAPER's keys), with
    a figure that names its architecture; Qwen3.5 is the paper's main model and overrides none."""
    import eval as experiments
    from models.mamba2 import Mamba2ForCausalLM
    from models.qwen35 import Qwen35ForCausalLM
    from models.rwkv7 import RWKV7
    assert Qwen35ForCausalLM.PAPER_FIGURES == {}
    for cls, name in ((Mamba2ForCausalLM, "Mamba-2"), (RWKV7, "RWKV-7")):
        assert cls.PAPER_FIGURES and set(cls.PAPER_FIGURES) <= set(experiments.PAPER)
        assert all(name in figure for figure in cls.PAPER_FIGURES.values())
