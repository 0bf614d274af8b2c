"""Mamba-2 (state-spaces/mamba2-*, AntonV/mamba2-*-hf): SSD mixer layers, nothing else, exposing
every write.

Glossary (paper ↔ code ↔ config.json: raw mamba_ssm `ssm_cfg` key | HF-converted key)
  B, T        batch, time;  D = d_model | hidden_size
  H, P        heads = expand·D / P;  P = headdim | head_dim;  d_inner = H·P
  N           d_state | state_size: the state's key side
  G           ngroups | n_groups: B_t, C_t come in G groups; head h reads group h // (H/G)
  K, V        our state orientation [K,V] = [N,P] (docs/DESIGN.md "Conventions");
              mamba_ssm and transformers store [P,N]
  x_t         [B,T,H,P] the conv'd input;
              Δ_t = dt [B,T,H] = softplus(dt_t + dt_bias) clamped to dt_limit
  A           [H] = −exp(A_log);  a_t = Δ_t A ≤ 0 the log-decay;  decay exp(a_t)
  B_t, C_t    [B,T,G,N] the write key and the read query
  S           per-head state [B,H,N,P] fp32:
              S_t = exp(Δ_t A) S_{t−1} + B_t (Δ_t x_t)ᵀ,  y_t = S_tᵀ C_t + D x_t
  record      the write record (models/common.py): additive = increment = B_t (Δ_t x_t)ᵀ
              (rank 1) -> add_k = inc_k = B_t (of the head's group), add_v = inc_v = Δ_t x_t;
              decay exp(Δ_t A) [B,T,H,1];  query C_t;  gain = w ⊙ silu(z) / rms (the gated
              norm's local diagonal gain from y_t to the out-projection input)
  Q           chunk length of `chunked`;  γ_i = a_1 + … + a_i inside a chunk

Cache.layers[i] = {"conv": [B,d_conv−1,conv_dim] the last conv inputs, "ssm": S [B,H,N,P]}.
Reference: mamba_ssm 2.3 modules/mamba2.py (non-fused path) ≡ transformers 5.24 Mamba2Mixer.torch
path (docs/DESIGN.md "The native write per architecture"); chunked scan after mamba_ssm
modules/ssd_minimal.py.
"""

import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hub
from . import common
from .common import WriteModel, causal_conv, decay_exp, scan_with_edits

# raw mamba_ssm repos ship no tokenizer; the models were trained with this one
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
# our chunk length; results do not depend on it (the checkpoint's chunk_size tunes mamba_ssm's
# kernel)
SCAN_CHUNK = 64


@dataclass
class Mamba2Config:
    """Defaults are mamba_ssm Mamba2.__init__'s: a raw ssm_cfg lists only what differs from them."""
    d_model: int                        # D
    n_layer: int
    vocab_size: int                     # embedding rows, padded to pad_vocab_size_multiple
    d_state: int = 128                  # N
    d_conv: int = 4                     # width of the causal depthwise conv
    expand: int = 2                     # d_inner = expand · D
    headdim: int = 64                   # P
    ngroups: int = 1                    # G
    chunk_size: int = 256               # mamba_ssm's kernel chunk; only stored (see SCAN_CHUNK)
    eps: float = 1e-5                   # both RMSNorms
    dt_limit: tuple = (0.0, math.inf)   # clamp of Δ
    bias: bool = False                  # in_proj / out_proj bias
    conv_bias: bool = True
    tie_embeddings: bool = True         # lm_head = embedding
    eos_id: int = 0

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def n_heads(self):
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):  # the conv runs over [x | B | C]
        return self.d_inner + 2 * self.ngroups * self.d_state

    @classmethod
    def from_hf(cls, c: dict) -> "Mamba2Config":
        """Either format. A key the file omits takes the default of the code that wrote the file:
        transformers' Mamba2Config for HF files (they are diffs against it), mamba_ssm's Mamba2
        module (= the defaults above) for raw `ssm_cfg`s, never another model's size."""
        if c.get("model_type") == "mamba2":
            kw = cls.hf_fields(c)
        elif "d_model" in c and "ssm_cfg" in c:
            kw = cls.raw_fields(c)
        else:
            raise hub.CheckpointError("config.json is neither a mamba_ssm config (d_model, "
                                      "ssm_cfg) nor model_type 'mamba2'")
        # transformers 5 writes inf as {"__float__": "Infinity"}
        kw["dt_limit"] = tuple(float(v["__float__"]) if isinstance(v, dict) else float(v)
                               for v in kw.get("dt_limit", cls.dt_limit))
        eos = kw.get("eos_id", cls.eos_id)
        kw["eos_id"] = eos[0] if isinstance(eos, list) else eos
        return cls(**kw)

    @staticmethod
    def hf_fields(c: dict) -> dict:
        """The fields of an HF-converted config.json (model_type mamba2)."""
        kw = {f: c.get(k, default) for f, (k, default) in HF_KEYS.items()}
        if "num_heads" in c and c["num_heads"] * kw["headdim"] != kw["expand"] * kw["d_model"]:
            raise hub.CheckpointError(f"config.json: num_heads {c['num_heads']} × head_dim "
                                      f"{kw['headdim']} != expand × hidden_size "
                                      f"{kw['expand'] * kw['d_model']}")
        return kw

    @staticmethod
    def raw_fields(c: dict) -> dict:
        """The fields of a raw mamba_ssm config.json (d_model, n_layer, ssm_cfg)."""
        ssm = c["ssm_cfg"]
        if ssm.get("layer", "Mamba1") != "Mamba2":
            raise hub.CheckpointError(f"config.json: ssm_cfg layer {ssm.get('layer', 'Mamba1')!r}; "
                                      f"this file reads Mamba-2 only")
        for key, ours in RAW_SUPPORTED.items():
            got = ssm.get(key, c.get(key, ours))
            if (got or None) != (ours or None):  # or None: [], 0, False and None all mean "off"
                raise hub.CheckpointError(f"config.json: {key} = {got!r} is not supported "
                                          f"(only {ours!r})")
        missing = [k for k in ("n_layer", "vocab_size") if k not in c]
        if missing:
            raise hub.CheckpointError(f"config.json: missing {missing[0]!r}")
        m = c.get("pad_vocab_size_multiple", 8)  # mamba_ssm pads the rows to a multiple of m
        return {**{k: ssm[k] for k in RAW_SSM_KEYS if k in ssm},
                "d_model": c["d_model"], "n_layer": c["n_layer"],
                "vocab_size": -(-c["vocab_size"] // m) * m,
                "tie_embeddings": c.get("tie_embeddings", True)}

    def to_hf(self) -> dict:
        """config.json as transformers' Mamba2ForCausalLM.save_pretrained writes it (the
        HF-converted layout)."""
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
                "num_heads": self.n_heads,
                **{k: getattr(self, f) for f, (k, _) in HF_KEYS.items()},
                "time_step_limit": list(self.dt_limit),
                "residual_in_fp32": True, "hidden_act": "silu", "pad_token_id": self.eos_id,
                "bos_token_id": self.eos_id}


# field: (HF config key, transformers Mamba2Config default): one table for reading and writing
# HF configs
HF_KEYS = {"d_model": ("hidden_size", 4096), "n_layer": ("num_hidden_layers", 64),
           "vocab_size": ("vocab_size", 32768), "d_state": ("state_size", 128),
           "d_conv": ("conv_kernel", 4), "expand": ("expand", 2), "headdim": ("head_dim", 64),
           "ngroups": ("n_groups", 8), "chunk_size": ("chunk_size", 256),
           "eps": ("layer_norm_epsilon", 1e-5), "dt_limit": ("time_step_limit", (0.0, math.inf)),
           "bias": ("use_bias", False), "conv_bias": ("use_conv_bias", True),
           "tie_embeddings": ("tie_word_embeddings", False), "eos_id": ("eos_token_id", 2)}
RAW_SSM_KEYS = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "dt_limit",
                "bias", "conv_bias")
# what this file implements of mamba_ssm's options (ssm_cfg or top level); another value is an error
RAW_SUPPORTED = dict(D_has_hdim=False, rmsnorm=True, norm_before_gate=False, d_ssm=None,
                     d_intermediate=0, attn_layer_idx=[], rms_norm=True)


# ------------------------------------------------------------------------------------------------
# The SSD recurrence. inputs: x [B,T,H,P], dt [B,T,H] (Δ), B [B,T,G,N], C [B,T,G,N];
# A, D [H] per head

def group_to_heads(t, H):
    """[..., G, N] -> [..., H, N]: head h reads group h // (H/G) (a view when G = 1)."""
    *lead, G, N = t.shape
    return t.unsqueeze(-2).expand(*lead, G, H // G, N).reshape(*lead, H, N)


def step(state, x_t: dict, edit_fn=None, *, A, D):
    """One token: decay, write, (edit), read. state [B,H,N,P] fp32 or None (= zeros)."""
    x, dt = x_t["x"], x_t["dt"]                                     # [B,H,P], [B,H]
    Bn, H, P = x.shape
    k = group_to_heads(x_t["B"], H)                                 # [B,H,N]  key B_t
    q = group_to_heads(x_t["C"], H)                                 # [B,H,N]  query C_t
    v = dt[..., None] * x                                           # [B,H,P]  value Δ_t x_t
    decay = torch.exp(dt * A)                                       # [B,H]    exp(Δ_t A)
    if state is None:
        state = x.new_zeros(Bn, H, k.shape[-1], P)
    write = k[..., :, None] * v[..., None, :]                       # [B,H,N,P] B_t (Δ_t x_t)ᵀ
    S = decay[..., None, None] * state + write
    record = {"add_k": k[:, :, None], "add_v": v[:, :, None],       # [B,H,1,N|P]
              "inc_k": k[:, :, None], "inc_v": v[:, :, None],
              "decay": decay[..., None], "query": q}                # [B,H,1], [B,H,N]
    if edit_fn is not None:
        S = edit_fn(S, record)
    y = torch.einsum("bhnp,bhn->bhp", S, q) + D[:, None] * x        # [B,H,P]  S_tᵀ C_t + D x_t
    return S, y, record


# the token loop over step: recurrent(inputs, state=None, keep_states=False, *, A, D)
recurrent = functools.partial(common.recurrent, step)


def segsum(a):
    """a [..., Q] -> [..., Q, Q]: entry (i, j) = a_{j+1} + … + a_i for j ≤ i, 0 above the
    diagonal (the caller masks it). Sums masked copies rather than differencing two cumsums,
    which loses precision (ssd_minimal.segsum)."""
    Q = a.shape[-1]
    # x[i,j] = a_i for i > j, summed over i
    return a[..., None].expand(*a.shape, Q).tril(-1).cumsum(-2)


def chunked(inputs: dict, state=None, chunk_size=SCAN_CHUNK, *, A, D):
    """The same scan in chunks of Q tokens (SSD), the state carried chunk by chunk: matmuls inside
    a chunk, a loop over T/Q chunks, O(Q²) extra memory. The heads of a group share B and C, so
    the matmuls against the state fold those heads into their columns."""
    x, dt, Bg, Cg = inputs["x"], inputs["dt"], inputs["B"], inputs["C"]
    Bn, T, H, P = x.shape
    G, N = Bg.shape[2:]
    h = H // G                                                      # heads per group
    a = dt * A                                                      # [B,T,H]   log-decay Δ_t A
    v = dt[..., None] * x                                           # [B,T,H,P] value Δ_t x_t
    if state is None:
        S = x.new_zeros(Bn, G, N, h * P)                            # [B,G,N,h·P] the loop's S
    else:
        S = state.view(Bn, G, h, N, P).transpose(2, 3).flatten(-2)
    ys = []
    for s in range(0, T, chunk_size):  # the last chunk may be shorter: nothing is padded
        e = min(s + chunk_size, T)
        ac = a[:, s:e].transpose(1, 2).unflatten(1, (G, h))         # [B,G,h,Q]
        vc = v[:, s:e].unflatten(2, (G, h))                         # [B,Q,G,h,P]
        Bc = Bg[:, s:e].transpose(1, 2)                             # [B,G,Q,N]
        Cc = Cg[:, s:e].transpose(1, 2)                             # [B,G,Q,N]
        L = decay_exp(segsum(ac)).tril()                            # [B,G,h,Q,Q] exp(a_{j+1}+…+a_i)
        # 1. inside the chunk, the loop's y_i gets Σ_{j≤i} exp(a_{j+1} + … + a_i) (C_i·B_j) Δ_j x_j
        scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(2) * L      # [B,G,h,Q,Q]
        y = scores @ vc.permute(0, 2, 3, 1, 4)                      # [B,G,h,Q,P]
        # 2. ... plus the read of the state carried in, decayed to i: exp(γ_i) C_iᵀ S_{s−1}
        decay_in = decay_exp(ac.cumsum(-1)).transpose(-1, -2)[..., None]   # [B,G,Q,h,1] exp(γ_i)
        read_in = ((Cc @ S).unflatten(-1, (h, P)) * decay_in).transpose(1, 2)  # [B,Q,G,h,P]
        y = y.permute(0, 3, 1, 2, 4) + read_in                      # [B,Q,G,h,P]
        # 3. the chunk's own writes, decayed to its end:
        #    Σ_j exp(a_{j+1} + … + a_Q) B_j (Δ_j x_j)ᵀ (L's last row)
        vend = vc * L[..., -1, :].permute(0, 3, 1, 2)[..., None]    # [B,Q,G,h,P]
        dS = Bc.transpose(-1, -2) @ vend.transpose(1, 2).flatten(-2)   # [B,G,N,h·P]
        # 4. carry: the loop's S at the chunk's end, exp(γ_Q) S_{s−1} + dS
        S = (S.unflatten(-1, (h, P)) * decay_in[:, :, -1:]).flatten(-2) + dS
        ys.append(y.flatten(2, 3) + D[:, None] * x[:, s:e])         # [B,Q,H,P]  + D x_t
    key = group_to_heads(Bg, H)[:, :, :, None]                      # [B,T,H,1,N]
    record = {"add_k": key, "add_v": v[:, :, :, None],              # [B,T,H,1,P]
              "decay": torch.exp(a)[..., None],                     # [B,T,H,1]
              "query": group_to_heads(Cg, H)}                       # [B,T,H,N]
    record.update(inc_k=record["add_k"], inc_v=record["add_v"])
    S = S.unflatten(-1, (h, P)).transpose(2, 3).reshape(Bn, H, N, P)   # [B,H,N,P]
    return torch.cat(ys, dim=1), S, record


SCANS = {"chunked": chunked, "recurrent": recurrent}


# ------------------------------------------------------------------------------------------------
# Layers, named like the Hub keys

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):                                           # fp32 in, fp32 out
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class GatedRMSNorm(RMSNorm):
    """RMSNorm(y ⊙ silu(z)) per group of d_inner/G channels: gate first, then normalise
    (norm_before_gate=False). Also returns the local diagonal gain w ⊙ silu(z) / rms, the factor
    from y to the output at a fixed rms."""

    def __init__(self, dim, groups, eps):
        super().__init__(dim, eps)
        self.groups = groups

    def forward(self, y, z, want_gain=False):                       # [B,T,d_inner] fp32 each
        gate = F.silu(z).unflatten(-1, (self.groups, -1))           # [B,T,G,d_inner/G]
        gated = y.unflatten(-1, (self.groups, -1)) * gate
        rstd = torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)   # [B,T,G,1]
        w = self.weight.float()
        gain = (gate * rstd).flatten(-2) * w if want_gain else None
        return (gated * rstd).flatten(-2) * w, gain


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_heads
        d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + H    # z | x B C | dt
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.ngroups, cfg.eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        # mamba_ssm's init: Δ log-uniform in [1e-3, 0.1] (heads start with memory), A in [1,16]
        with torch.no_grad():
            log_dt = torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
            dt = torch.exp(log_dt).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.copy_(torch.empty(H).uniform_(1, 16).log())

    def forward(self, u, past: dict, t0: int, edits, impl: str, want_record: bool):
        cfg = self.cfg
        H, G, N = cfg.n_heads, cfg.ngroups, cfg.d_state
        zxbcdt = self.in_proj(u.to(self.in_proj.weight.dtype)).float()   # [B,T,2·d_inner+2GN+H]
        z, xBC, dt = zxbcdt.split([cfg.d_inner, cfg.conv_dim, H], dim=-1)
        bias = None if self.conv1d.bias is None else self.conv1d.bias.float()
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight.float(), bias,
                                      past.get("conv"))             # [B,T,conv_dim]
        xBC = F.silu(xBC)
        x, Bm, Cm = xBC.split([cfg.d_inner, G * N, G * N], dim=-1)  # [B,T,d_inner], [B,T,GN] ×2
        inputs = {"x": x.unflatten(-1, (H, cfg.headdim)),           # [B,T,H,P]
                  "dt": F.softplus(dt + self.dt_bias.float()).clamp(*cfg.dt_limit),   # [B,T,H]
                  "B": Bm.unflatten(-1, (G, N)), "C": Cm.unflatten(-1, (G, N))}        # [B,T,G,N]
        y, S, record = scan_with_edits(SCANS[impl], step, inputs, past.get("ssm"), edits, t0,
                                       "additive", A=-torch.exp(self.A_log.float()),
                                       D=self.D.float())
        o, gain = self.norm(y.flatten(2), z, want_record)           # [B,T,d_inner]
        if want_record:
            record["gain"] = gain.unflatten(-1, (H, cfg.headdim))   # [B,T,H,P]
        out = self.out_proj(o.to(self.out_proj.weight.dtype)).float()   # [B,T,D]
        return out, {"conv": conv_state, "ssm": S}, record


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h, past, shared, t0, edits, impl, want_record):  # residual stream h fp32
        out, new, record = self.mixer(self.norm(h), past, t0, edits, impl, want_record)
        return h + out, new, record


class Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.eps)


class Mamba2ForCausalLM(WriteModel):
    arch, layer_kind, default_write = "mamba2", "Mamba-2", "additive"
    write_rank = {"additive": 1, "increment": 1}
    state_key = "ssm"
    layers_key, final_norm_key = "backbone.layers", "backbone.norm_f"
    out_proj_key = "mixer.out_proj"
    READ_PATH = (
        "Mamba-2: read y = SᵀC_t + D x_t — the D skip does not see the state, so it cancels in Δℓ; "
        "gain = w ⊙ silu(z)/rms(y ⊙ silu(z)) (gate, then norm); out_proj. Transport exp(ΔA) is a "
        "scalar: G is exact, but 'exact' keeps the norm's diagonal gain (its input y + D x needs "
        "x, which the writes lack).")
    PAPER_FIGURES = {
        "win": "88.1% [86.8, 89.3] (2,500 firings, Mamba-2-370M L24 H0)",
        "closed": "−0.07 (Mamba-2 L24 H0)",
        "register cos": "0.0575 (Mamba-2)",
    }

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.write_layers = tuple(range(config.n_layer))
        self.n_heads, self.state_shape = config.n_heads, (config.d_state, config.headdim)

    def embed(self, ids, t0):
        return self.backbone.embeddings(ids).float(), {}                      # [B,T,D] fp32

    def lm_head_weight(self):
        """[vocab,D]: the embedding when the head is tied (no lm_head module then)."""
        if self.lm_head is None:
            return self.backbone.embeddings.weight
        return self.lm_head.weight

    @property
    def head_norm_eps(self):
        return self.config.eps

    @staticmethod
    def norm_jacobian(o, v, eps):
        """v unchanged: the gated norm sees y ⊙ silu(z) with y = SᵀC + D x, and x is not in the
        write record, so the diagonal gain is all there is to use."""
        return v

    @staticmethod
    def transport_key(key, record_s):
        """key [..,r,K] <- exp(Δ_s A) key: the decay is a scalar, so the transport is exact.
        record_s: the write record at s, head axis removed, no time axis."""
        return record_s["decay"][..., None, :] * key


# ------------------------------------------------------------------------------------------------
# Checkpoints

# raw mamba_ssm -> HF-converted names
RENAME = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def load_tokenizer(path: Path, tokenizer, cfg: Mamba2Config):
    """tokenizer= if given (a failure raises; False = none wanted); else the checkpoint's
    tokenizer.json; else GPT-NeoX-20B's. A raw repo ships none, and offline the default may be
    unreachable: the model still loads for callers that pass ids, with a warning, and the
    tokenizer raises the reason on first use."""
    if tokenizer is False:
        return hub.MissingTokenizer("loaded with tokenizer=False: pass ids, or load with "
                                    "tokenizer=", cfg.eos_id, cfg.vocab_size)
    if tokenizer is not None or (path / "tokenizer.json").exists():
        return hub.load_tokenizer(tokenizer or path, eos_id=cfg.eos_id)
    try:
        return hub.load_tokenizer(DEFAULT_TOKENIZER, eos_id=cfg.eos_id)
    except hub.CheckpointError as e:
        why = f"{path} ships no tokenizer and the default failed: {e}"
        warnings.warn(why, stacklevel=3)
        return hub.MissingTokenizer(why, cfg.eos_id, cfg.vocab_size)


def from_pretrained(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """A raw mamba_ssm directory (config.json with d_model/ssm_cfg + pytorch_model.bin, fp16 or
    fp32) or an HF-converted one (model_type mamba2 + safetensors)
    -> (model in eval mode, tokenizer)."""
    path = hub.resolve(path)
    raw = hub.read_config(path)
    if raw is None:
        raise hub.CheckpointError(f"no config.json in {path}")
    cfg = Mamba2Config.from_hf(raw)
    sd = {RENAME.get(n, n): t for n, t in hub.read_state_dict(path).items()}
    if cfg.tie_embeddings:
        # the raw .bin stores the tied head as a second name of the embedding
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Mamba2ForCausalLM(cfg)
    hub.check_tensors(sd, {n: p.shape for n, p in model.state_dict().items()}, str(path))
    sd = {n: t.to(device=device, dtype=dtype) for n, t in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval(), load_tokenizer(path, tokenizer, cfg)


def save_pretrained(model: Mamba2ForCausalLM, path, dtype=torch.float16):
    """The HF-converted layout: config.json (model_type mamba2) + model.safetensors; a tied head
    is not stored."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    sd = {n: t.detach().to("cpu", dtype).contiguous() for n, t in model.state_dict().items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
