"""RWKV-7 "Goose" (x070) from scratch: BlinkDL .pth and fla/HF safetensors, the rank-2 cache
write, the World tokenizer.

Glossary (paper / this file / Hub config)
  B, T, C        batch, tokens, width (hidden_size = n_embd)
  H, K, V        heads (num_heads), key dim = value dim = head_dim
                 (BlinkDL head_size N = 64)
  S              the per-head state [B,H,K,V], key side first
                 (fla's orientation; BlinkDL keeps Sᵀ [V,K])
  r              receptance = the query; read o_t = S_tᵀ r_t (no 1/√K scaling)
  w              log decay per key channel, w = −e^{−1/2} σ(·) ∈ (−0.607, 0);
                 decay diag(e^{w_t}) ∈ (0.545, 1)
  k (= k̃)        the written key k ⊙ (1 + (a_rate − 1) ⊙ k_a);
                 v the value (layers ≥ 1 lerp it toward v_first)
  kk (= κ̂)       the erase direction, normalize_per_head(k ⊙ k_k)
  a, b           the low-rank transition: a = −κ̂, b = κ̂ ⊙ a_rate
                 (a_rate = the "in-context learning rate")
  u              the pseudo-value S_{t−1}ᵀ a_t, i.e. what the erase removes
  G              cumulative log decay inside a chunk (chunked form only);  L = chunk length
  record         the write record (models/common.py), below

The recurrence (one head):  S_t = diag(e^{w_t}) S_{t−1} + b_t u_tᵀ + k̃_t v_tᵀ,  o_t = S_tᵀ r_t.
Write record: the increment S_t − diag(e^{w_t}) S_{t−1} = [k̃_t, b_t] ⊗ [v_t, u_t] (rank 2,
default) and the additive part k̃_t v_tᵀ (rank 1).
Reference: rwkv 0.8.32 `RWKV_x070_TMix_seq` (BlinkDL), fla `layers/rwkv7.py` +
`ops/generalized_delta_rule/dplr`.
"""

import ast
import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hub
from . import common
from .common import WriteModel, rms_norm_jacobian, scan_with_edits


@dataclass
class RWKV7Config:
    vocab_size: int = 65536
    hidden_size: int = 2048          # C
    num_hidden_layers: int = 24
    head_dim: int = 64               # K = V; BlinkDL's package hard-codes the GroupNorm eps for 64
    decay_low_rank_dim: int = 96     # w1/w2 (w_lora)
    a_low_rank_dim: int = 96         # a1/a2 (a_lora)
    v_low_rank_dim: int = 64         # v1/v2 (v_lora, layers ≥ 1)
    gate_low_rank_dim: int = 256     # g1/g2 (g_lora)
    intermediate_size: int = 8192    # channel-mix hidden width (4C)
    norm_eps: float = 1e-5           # LayerNorms; the per-head GroupNorm uses head_dim · norm_eps
    tie_word_embeddings: bool = False

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @classmethod
    def from_hf(cls, c: dict) -> "RWKV7Config":
        """fla `RWKV7Config` (config.json, model_type rwkv7). Null LoRA ranks get fla's default
        formulas."""
        value_dims = c.get("value_dim") or []
        if c.get("attn") is not None or any(d not in (None, c["hidden_size"]) for d in value_dims):
            raise hub.CheckpointError("rwkv7 config with attention layers or value_dim != "
                                      "hidden_size is not supported")
        C = c["hidden_size"]
        N = c.get("head_dim") or C // c["num_heads"]

        def rank(m, scale):
            return max(32, int(round(m * C ** 0.5 * scale / 32) * 32))

        ffn = c.get("intermediate_size") or 32 * math.ceil(C * (c.get("hidden_ratio") or 4) / 32)
        return cls(c["vocab_size"], C, c["num_hidden_layers"], N,
                   c.get("decay_low_rank_dim") or rank(2.5, N / 64),
                   c.get("a_low_rank_dim") or rank(2.5, N / 64),
                   c.get("v_low_rank_dim") or rank(1.7, N / 64),
                   c.get("gate_low_rank_dim") or rank(5, 1),
                   ffn, c.get("norm_eps", 1e-5), c.get("tie_word_embeddings", False))

    @classmethod
    def from_blinkdl(cls, sd: dict) -> "RWKV7Config":
        """A BlinkDL .pth has no config: every size is read off a tensor shape."""
        need = ["emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1",
                "blocks.0.att.g1", "blocks.0.ffn.key.weight"]
        for name in need:
            if name not in sd:
                raise hub.CheckpointError(f"BlinkDL state dict: missing tensor {name!r}")
        vocab, C = sd["emb.weight"].shape
        layers = 1 + max(int(n.split(".")[1]) for n in sd if n.startswith("blocks."))
        v1 = sd.get("blocks.1.att.v1", sd.get("blocks.0.att.v1"))
        return cls(vocab, C, layers, sd["blocks.0.att.r_k"].shape[1],
                   sd["blocks.0.att.w1"].shape[1], sd["blocks.0.att.a1"].shape[1],
                   32 if v1 is None else v1.shape[1], sd["blocks.0.att.g1"].shape[1],
                   sd["blocks.0.ffn.key.weight"].shape[0])


# ------------------------------------------------------------------------------------------------
# The recurrence, literally. inputs: r, w, k, a, b [B,T,H,K] and v [B,T,H,V] (w = log decay)

def step(state, x_t: dict, edit_fn=None, **kw):
    """One token: S_t = diag(e^{w_t}) S_{t−1} + b_t (a_tᵀ S_{t−1}) + k̃_t v_tᵀ, then (edit, then)
    o_t = S_tᵀ r_t."""
    r, w, k, v, a, b = (x_t[n].float() for n in "rwkvab")           # [B,H,K], v [B,H,V]
    S = r.new_zeros(*k.shape, v.shape[-1]) if state is None else state.float()   # [B,H,K,V]
    decay = w.exp()                                                 # [B,H,K]
    u = torch.einsum("bhk,bhkv->bhv", a, S)                         # [B,H,V] S_{t−1}ᵀ a_t
    S = decay[..., None] * S + b[..., None] * u[..., None, :] + k[..., None] * v[..., None, :]
    record = dict(add_k=k[:, :, None], add_v=v[:, :, None],         # [B,H,1,K], [B,H,1,V]
                  inc_k=torch.stack([k, b], 2),                     # [B,H,2,K]
                  inc_v=torch.stack([v, u], 2),                     # [B,H,2,V]
                  decay=decay, query=r)
    if edit_fn is not None:
        S = edit_fn(S, record)
    o = torch.einsum("bhk,bhkv->bhv", r, S)                         # [B,H,V]
    return S, o, record


# the token loop over step: recurrent(inputs, state=None, keep_states=False)
recurrent = functools.partial(common.recurrent, step)


def pseudo_value_terms(a_dec, b_inv, k_inv, v):
    """The loop's u_i = S_{i−1}ᵀ a_i solves (I − A_ab) U = a_dec S_0 + A_ak V, so U = W S_0 + U_0.
    a_dec, b_inv, k_inv [B,H,N,L,K] and v [B,H,N,L,V] chunked as in `chunked`
    -> (W [B,H,N,L,K], U_0 [B,H,N,L,V])."""
    K = a_dec.shape[-1]
    A_ab = a_dec @ b_inv.transpose(-1, -2)                          # u_i sees erases j < i
    A_ak = (a_dec @ k_inv.transpose(-1, -2)).tril_(-1)              # u_i sees writes j < i
    # solve_triangular reads only the strictly lower part of −A_ab (unitriangular: the
    # diagonal is taken as 1)
    WU = torch.linalg.solve_triangular(-A_ab, torch.cat([a_dec, A_ak @ v], -1), upper=False,
                                       unitriangular=True)
    return WU.split([K, v.shape[-1]], -1)


def carry_chunks(S, U0, W, G, KV, b_end):
    """The sequential part of `chunked`, over chunks only: the pseudo-values U need S_0, and the
    next S_0 needs U. S [B,H,K,V] before the first chunk; U0 [B,H,N,L,V], W and G [B,H,N,L,K],
    KV [B,H,N,K,V], b_end [B,H,N,K,L] -> (every chunk's S_0 [B,H,N,K,V], U [B,H,N,L,V], the
    final state [B,H,K,V])."""
    starts, us = [], []
    for n in range(G.shape[2]):
        starts.append(S)
        u = U0[:, :, n] + W[:, :, n] @ S                            # [B,H,L,V] = loop's u_i
        S = G[:, :, n, -1, :, None].exp() * S + KV[:, :, n] + b_end[:, :, n] @ u
        us.append(u)
    return torch.stack(starts, 2), torch.stack(us, 2), S


def chunked(inputs: dict, state=None, chunk_size=32, **kw):
    """The DPLR chunked form, matmuls only: same (out, final state, record) as `recurrent`, any T.

    Inside a chunk (positions i = 1..L after state S_0), unrolling the loop gives
      S_i = e^{G_i} ⊙ S_0 + Σ_{j≤i} e^{G_i−G_j} ⊙ (b_j u_jᵀ + k_j v_jᵀ)    (⊙ per key channel)
    and because the decay is per channel, e^{G_i−G_j} = e^{G_i} e^{−G_j} factors every pair term
    into a matmul. Safe in fp32 because RWKV-7 bounds w ≥ −0.607: e^{−G} ≤ e^{0.607 L} = 3e8 at
    L = 32 (7e16 at 64), far from overflow. The default L = 32 is a speed choice (the L² pair
    terms against the sequential steps; see docs/PERFORMANCE.md).
    """
    B, T, H, K = inputs["r"].shape
    V = inputs["v"].shape[-1]
    L = min(chunk_size, T)  # a short input (a decode step) is one unpadded chunk
    if state is None:
        S = inputs["r"].new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        S = state.float()
    pad = -T % L  # padded tokens are inert: decay 1 (w = 0), no write, no read

    def to_chunks(x):                                               # [B,T,H,D] -> [B,H,N,L,D]
        x = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
        # contiguous once, not in every matmul
        return x.view(B, -1, L, H, x.shape[-1]).permute(0, 3, 1, 2, 4).contiguous()

    r, w, k, v, a, b = (to_chunks(inputs[n]) for n in "rwkvab")
    # 1. cumulative log decay: G_i = Σ_{s≤i} w_s (what S_i has seen of S_0), and the exclusive
    #    G_{i−1} seen by u_i
    G = w.cumsum(-2)                                                # [B,H,N,L,K]
    r_dec = r * G.exp()                                             # read S_i
    a_dec = a * (G - w).exp()                                       # erase reads S_{i−1}
    undo = (-G).exp()
    k_inv = k * undo                                                # writes at j, undecayed to 0
    b_inv = b * undo
    # 2. pair matrices [B,H,N,L,L]: (x ⊙ e^{G_i}) (y ⊙ e^{−G_j})ᵀ = Σ_c x_c e^{G_i−G_j} y_c,
    #    made causal
    A_rb = (r_dec @ b_inv.transpose(-1, -2)).tril_()                # o_i sees j ≤ i
    A_rk = (r_dec @ k_inv.transpose(-1, -2)).tril_()
    # 3. the pseudo-values as U = W S_0 + U_0 (UT transform)
    W, U0 = pseudo_value_terms(a_dec, b_inv, k_inv, v)              # [B,H,N,L,K], [B,H,N,L,V]
    # 4. chunk-end state pieces: S_L = e^{G_L} ⊙ S_0 + (k ⊙ e^{G_L−G})ᵀ V + (b ⊙ e^{G_L−G})ᵀ U
    to_end = (G[..., -1:, :] - G).exp()                             # [B,H,N,L,K] ≤ 1
    KV = (k * to_end).transpose(-1, -2) @ v                         # [B,H,N,K,V]
    b_end = (b * to_end).transpose(-1, -2)                          # [B,H,N,K,L]
    # 5. sequential over chunks only
    S0, U, S = carry_chunks(S, U0, W, G, KV, b_end)                 # [B,H,N,K,V], [B,H,N,L,V]
    # 6. o_i = S_iᵀ r_i = (r ⊙ e^{G}) S_0 + A_rb U + A_rk V, for all chunks at once
    O = r_dec @ S0 + A_rb @ U + A_rk @ v                            # [B,H,N,L,V]

    def from_chunks(x):                                             # [B,H,N,L,D] -> [B,T,H,D]
        return x.permute(0, 2, 3, 1, 4).reshape(B, -1, H, x.shape[-1])[:, :T]

    r, w, k, v, b = (inputs[n].float() for n in "rwkvb")            # the unchunked [B,T,H,·]
    u = from_chunks(U)                                              # [B,T,H,V]
    record = dict(add_k=k[:, :, :, None], add_v=v[:, :, :, None],   # [B,T,H,1,K|V]
                  inc_k=torch.stack([k, b], 3), inc_v=torch.stack([v, u], 3),   # [B,T,H,2,K|V]
                  decay=w.exp(), query=r)
    return from_chunks(O), S, record


SCANS = {"chunked": chunked, "recurrent": recurrent}


# ------------------------------------------------------------------------------------------------
# The model, modules named like the fla/HF keys (model.layers.{i}.attn.r_proj, ...)

def token_shift(x, last):
    """The previous token's x for every position [B,T,C]; `last` [B,C] continues from a cache
    (zeros at start)."""
    prev = x.new_zeros(x[:, :1].shape) if last is None else last[:, None].to(x)
    return torch.cat([prev, x[:, :-1]], 1)


class LoRA(nn.Module):
    """BlinkDL's x ↦ act(x w1) w2 + w0 as fla's `lora.0` / activation / `lora.2` (bias = w0)."""

    def __init__(self, C, rank, act, bias=True):
        super().__init__()
        self.lora = nn.Sequential(nn.Linear(C, rank, bias=False), act,
                                  nn.Linear(rank, C, bias=bias))

    def forward(self, x):
        return self.lora(x)


class Attention(nn.Module):
    """The time mix: token shift, six lerps, the LoRAs, the scan, per-head GroupNorm, the bonus,
    the gate."""

    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        C, H, N = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.layer, self.H, self.N, self.eps = layer, H, N, N * cfg.norm_eps
        # lerp toward the previous token, per channel; starting values for random init
        for m in "rwkvag":
            setattr(self, f"x_{m}", nn.Parameter(torch.full((1, 1, C), 0.5)))
        self.k_k = nn.Parameter(torch.full((C,), 0.85))
        self.k_a = nn.Parameter(torch.ones(C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.w_lora = LoRA(C, cfg.decay_low_rank_dim, nn.Tanh())
        # spread the decays so that random heads start with memory (w0 = −6 → e^w ≈ 0.9985)
        with torch.no_grad():
            self.w_lora.lora[2].bias.copy_(torch.linspace(-6, 1, C))
        if layer > 0:  # layer 0 defines v_first; the others lerp toward it
            self.v_lora = LoRA(C, cfg.v_low_rank_dim, nn.Identity())
        self.a_lora = LoRA(C, cfg.a_low_rank_dim, nn.Identity())
        self.g_lora = LoRA(C, cfg.gate_low_rank_dim, nn.Sigmoid(), bias=False)
        # its weight and bias, applied by hand in fp32 in forward
        self.g_norm = nn.GroupNorm(H, C, eps=self.eps)

    def forward(self, x, v_first, last, S, edits, t0, scan):
        """x [B,T,C] (normed) -> (out [B,T,C], v_first, final S, write record with gain)."""
        B, T, C = x.shape
        H, N = self.H, self.N

        def per_head(z):                                            # [B,T,C] -> [B,T,H,K] fp32
            return z.reshape(B, T, H, N).float()

        dx = token_shift(x, last) - x
        xr, xw, xk, xv, xa, xg = (x + dx * getattr(self, f"x_{m}") for m in "rwkvag")
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)  # [B,T,C]
        w = -math.exp(-0.5) * torch.sigmoid(self.w_lora(xw).float())   # [B,T,C] log decay
        a = torch.sigmoid(self.a_lora(xa))                          # [B,T,C] a_rate
        g = self.g_lora(xg)                                         # [B,T,C] output gate
        if self.layer == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v_lora(xv)))
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1)   # [B,T,H,K] κ̂ from the raw k
        k = k * (1 + (a - 1) * self.k_a)                            # k̃
        inputs = dict(r=per_head(r), w=per_head(w), k=per_head(k), v=per_head(v),
                      a=-kk.float(), b=kk.float() * per_head(a))
        o, S, record = scan_with_edits(scan, step, inputs, S, edits, t0,
                                       "increment")                 # o [B,T,H,V]
        # per-head GroupNorm (fp32), then the bonus Σ_j r_j k̃_j r_k[h,j] · v, which bypasses the
        # state and the norm
        gamma = self.g_norm.weight.float().view(H, N)
        beta = self.g_norm.bias.float().view(H, N)
        std = (o.var(-1, unbiased=False, keepdim=True) + self.eps).sqrt()   # [B,T,H,1]
        y = (o - o.mean(-1, keepdim=True)) / std * gamma + beta
        bonus = (inputs["r"] * inputs["k"] * self.r_k.float()).sum(-1, keepdim=True)   # [B,T,H,1]
        y = y + bonus * inputs["v"]
        # gain: ∂(o_proj input)/∂o_t holding the head's mean and std fixed = γ/σ ⊙ g. It leaves out
        # the mean subtraction and σ's own dependence on o_t, the bias β, the bonus (not a state
        # read) and o_proj itself.
        record["gain"] = gamma / std * per_head(g)                  # [B,T,H,V]
        out = self.o_proj((y.reshape(B, T, C) * g.float()).to(x.dtype))
        return out, v_first, S, record


class FeedForward(nn.Module):
    """The channel mix: token shift lerp, squared ReLU, no receptance gate in v7."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.full((cfg.hidden_size,), 0.5))
        self.key = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.value = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, last):
        xk = x + (token_shift(x, last) - x) * self.x_k
        return self.value(torch.relu(self.key(xk)) ** 2)


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer: int):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.norm_eps
        if layer == 0:  # BlinkDL ln0: a LayerNorm on the embeddings
            self.pre_norm = nn.LayerNorm(C, eps=eps)
        self.attn_norm, self.ffn_norm = nn.LayerNorm(C, eps=eps), nn.LayerNorm(C, eps=eps)
        self.attn, self.ffn = Attention(cfg, layer), FeedForward(cfg)

    def forward(self, x, past, shared, t0, edits, impl, want_record):
        """-> (x, this layer's new cache entry, write record). Layer 0 puts v_first in shared for
        the layers after it; the record's gain costs nothing extra, so want_record changes
        nothing."""
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        h = self.attn_norm(x)
        out, shared["v_first"], S, record = self.attn(
            h, shared.get("v_first"), past.get("attn_shift"), past.get("S"), edits, t0,
            SCANS[impl])
        x = x + out
        f = self.ffn_norm(x)
        x = x + self.ffn(f, past.get("ffn_shift"))
        return x, dict(attn_shift=h[:, -1], S=S, ffn_shift=f[:, -1]), record


class RWKV7(WriteModel):
    arch, layer_kind, default_write = "rwkv7", "RWKV-7", "increment"
    write_rank = {"additive": 1, "increment": 2}
    state_key = "S"
    layers_key, final_norm_key = "model.layers", "model.norm"
    out_proj_key = "attn.o_proj"
    READ_PATH = (
        "RWKV-7: read o = Sᵀr_t (no scaling); gain = γ/σ ⊙ g (per-head GroupNorm, then the output "
        "gate); o_proj. The bonus (r·k̃·r_k)v bypasses state and norm, so it cancels. "
        "G = Π diag(w_s) per key channel; the exact transport adds the rank-1 erase b(aᵀ·) and "
        "needs writes['a'] (absent: 'exact' only at h = 0); 'exact' also uses the GroupNorm's full "
        "local Jacobian (centring and σ).")
    PAPER_FIGURES = {
        "win": "47.8% (6,591 firings, RWKV-7-1.5B L12 H0, Table 6)",
        "register cos": "0.180 (RWKV-7)",
    }

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.config = cfg
        self.write_layers = tuple(range(cfg.num_hidden_layers))
        self.n_heads, self.state_shape = cfg.num_heads, (cfg.head_dim, cfg.head_dim)
        self.model = nn.ModuleDict(dict(
            embeddings=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def embed(self, ids, t0):
        return self.model.embeddings(ids), {}                                 # [B,T,C]

    @property
    def head_norm_eps(self):
        return self.config.head_dim * self.config.norm_eps                # the GroupNorm's

    @staticmethod
    def norm_jacobian(o, v, eps):
        """The per-head GroupNorm's local Jacobian at the read o [..,V] over its diagonal gain, on
        v [..,r,V]: an RMS norm's on the centred o and v (centring and σ)."""
        o_centred = o - o.mean(-1, keepdim=True)
        return rms_norm_jacobian(o_centred, v - v.mean(-1, keepdim=True), eps)

    @staticmethod
    def transport_key(key, record_s):
        """key [..,r,K] <- M_s key with M_s = diag(w_s) + b_s a_sᵀ (the decay and the rank-1
        erase; b is the increment's second key factor). record_s: the write record at s, head
        axis removed, no time axis. None when it lacks a (the scans do not return it)."""
        if "a" not in record_s:
            return None
        a_dot_key = (key * record_s["a"][..., None, :]).sum(-1, keepdim=True)   # [..,r,1]
        erase = a_dot_key * record_s["inc_k"][..., 1:2, :]                       # [..,r,K]
        return record_s["decay"][..., None, :] * key + erase


# ------------------------------------------------------------------------------------------------
# Loading: BlinkDL .pth names -> ours (fla/HF), the packed token-shift layout, save in the fla
# layout

BLINKDL_NAMES = [  # (BlinkDL regex, fla/HF name); first match wins
    (r"emb\.weight", "model.embeddings.weight"),
    (r"ln_out\.", "model.norm."),
    (r"head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.ln0\.", r"model.layers.\1.pre_norm."),
    (r"blocks\.(\d+)\.ln1\.", r"model.layers.\1.attn_norm."),
    (r"blocks\.(\d+)\.ln2\.", r"model.layers.\1.ffn_norm."),
    (r"blocks\.(\d+)\.att\.receptance\.", r"model.layers.\1.attn.r_proj."),
    (r"blocks\.(\d+)\.att\.key\.", r"model.layers.\1.attn.k_proj."),
    (r"blocks\.(\d+)\.att\.value\.", r"model.layers.\1.attn.v_proj."),
    (r"blocks\.(\d+)\.att\.output\.", r"model.layers.\1.attn.o_proj."),
    (r"blocks\.(\d+)\.att\.ln_x\.", r"model.layers.\1.attn.g_norm."),
    (r"blocks\.(\d+)\.att\.([wavg])0$", r"model.layers.\1.attn.\2_lora.lora.2.bias"),
    (r"blocks\.(\d+)\.att\.([wavg])1$", r"model.layers.\1.attn.\2_lora.lora.0.weight"),
    (r"blocks\.(\d+)\.att\.([wavg])2$", r"model.layers.\1.attn.\2_lora.lora.2.weight"),
    (r"blocks\.(\d+)\.att\.", r"model.layers.\1.attn."),   # x_r … x_g, k_k, k_a, r_k
    (r"blocks\.(\d+)\.ffn\.", r"model.layers.\1.ffn."),    # x_k, key, value
]
# BlinkDL multiplies x @ w1 @ w2: [in, out], nn.Linear wants [out, in]
BLINKDL_TRANSPOSED = r"att\.[wavg][12]$"
BLINKDL_FLAT = r"att\.([wav]0|k_k|k_a)$|ffn\.x_k$"  # stored [1,1,C], fla keeps [C]
# layer 0 defines v_first and has no value-residual LoRA
BLINKDL_UNUSED = r"blocks\.0\.att\.v[012]$"


def from_blinkdl(sd: dict) -> dict:
    out = {}
    for name, t in sd.items():
        if re.match(BLINKDL_UNUSED, name):
            continue
        new = next((re.sub("^" + pat, rep, name) for pat, rep in BLINKDL_NAMES
                    if re.match(pat, name)), name)
        if re.search(BLINKDL_TRANSPOSED, name):
            t = t.t()
        elif re.search(BLINKDL_FLAT, name):
            t = t.reshape(-1)
        out[new] = t.contiguous()
    return out


def unpack_token_shift(sd: dict) -> dict:
    """fla "version 1" checkpoints pack the six lerps as attn.x_x [6,1,1,C] in the order
    r, w, k, v, a, g."""
    for name in [n for n in sd if n.endswith("attn.x_x")]:
        x_x = sd.pop(name)
        if x_x.shape[0] != 6:
            raise hub.CheckpointError(f"tensor {name!r} has shape {list(x_x.shape)}, "
                                      f"expected [6,1,1,C]")
        for m, row in zip("rwkvag", x_x.reshape(6, -1)):
            sd[f"{name[:-3]}x_{m}"] = row.reshape(1, 1, -1)
    return sd


def from_pretrained(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """A BlinkDL .pth (file, or a directory holding one) or an fla/HF directory
    -> (RWKV7 in eval mode, tokenizer)."""
    path = hub.resolve(path)
    if path.is_dir() and not list(path.glob("*.safetensors")) and len(list(path.glob("*.pth"))) > 1:
        raise hub.CheckpointError(f"{path} holds several .pth files: pass the one to load (a file "
                                  f"path, or repo:FILENAME for a Hub repo)")
    config, sd = hub.read_config(path), hub.read_state_dict(path)
    if config is None:
        cfg, sd = RWKV7Config.from_blinkdl(sd), from_blinkdl(sd)
    else:
        if config.get("model_type") != "rwkv7":
            raise hub.CheckpointError(f"{path}: model_type {config.get('model_type')!r}, "
                                      f"expected 'rwkv7'")
        cfg, sd = RWKV7Config.from_hf(config), unpack_token_shift(sd)
        if cfg.tie_word_embeddings:
            sd.setdefault("lm_head.weight", sd.get("model.embeddings.weight"))
    with torch.device("meta"):
        model = RWKV7(cfg)
    hub.check_tensors(sd, {n: p.shape for n, p in model.state_dict().items()}, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    tok = load_tokenizer(tokenizer or path, cfg.vocab_size)
    return model.to(device=device, dtype=dtype).eval(), tok


def save_pretrained(model: RWKV7, path, dtype=torch.float16):
    """The fla/HF layout: config.json (model_type rwkv7) + model.safetensors with split
    x_r … x_g."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = dict(asdict(c), model_type="rwkv7", architectures=["RWKV7ForCausalLM"],
                  num_heads=c.num_heads, hidden_ratio=c.intermediate_size // c.hidden_size,
                  value_dim=[c.hidden_size] * c.num_hidden_layers, attn=None, attn_mode="chunk",
                  hidden_act="sqrelu", norm_first=True, norm_bias=True, fuse_norm=False)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    sd = {n: t.detach().to("cpu", dtype).contiguous() for n, t in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------
# Tokenizers: the RWKV World vocabulary (greedy longest match), or a tokenizer.json (GPT-NeoX,
# Pile models)

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"


@functools.lru_cache(maxsize=4)
def read_world_vocab(file: str) -> dict:
    """Lines `id <python str or bytes literal> n_bytes` -> {id: bytes}."""
    vocab = {}
    for line in Path(file).read_text(encoding="utf-8").splitlines():
        i, rest = line.split(" ", 1)
        literal, n = rest.rsplit(" ", 1)
        tok = ast.literal_eval(literal)
        tok = tok.encode("utf-8") if isinstance(tok, str) else tok
        if len(tok) != int(n):
            raise hub.CheckpointError(f"{file}: token {i} has {len(tok)} bytes, the file says {n}")
        vocab[int(i)] = tok
    return vocab


class WorldTokenizer:
    """RWKV World tokenizer: at each byte, the longest vocabulary entry that matches (all 256
    bytes are entries).
    id 0 is <|endoftext|> (EOS / document separator); it is never produced by encode."""

    eos_id = 0

    def __init__(self, file):
        self.id_to_bytes = read_world_vocab(str(Path(file).resolve()))
        self.bytes_to_id = {t: i for i, t in self.id_to_bytes.items()}
        lengths = {}  # first byte -> lengths of the entries that start with it, longest first
        for t in self.bytes_to_id:
            lengths.setdefault(t[0], set()).add(len(t))
        self.lengths = {c: sorted(n, reverse=True) for c, n in lengths.items()}

    def encode(self, text: str) -> list[int]:
        src, ids, i = text.encode("utf-8"), [], 0
        while i < len(src):
            n, tid = next((n, self.bytes_to_id[src[i:i + n]]) for n in self.lengths[src[i]]
                          if n <= len(src) - i and src[i:i + n] in self.bytes_to_id)
            ids.append(tid)
            i += n
        return ids

    def decode(self, ids) -> str:
        """An id with no entry reads as "<id N>": the 65536-row head scores 65530..65535 too, and a
        sampled or top-scoring id must not stop an experiment."""
        out = [self.id_to_bytes.get(i, f"<id {i}>".encode()) if i else b"<|endoftext|>"
               for i in map(int, ids)]
        return b"".join(out).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return max(self.id_to_bytes) + 1


WORLD_ROWS = 65536  # embedding / head rows of World and G1 releases: 65529 vocabulary ids + padding


def packaged_world_vocab() -> Path | None:
    """The World vocabulary inside the `rwkv` pip wheel, if that package is installed."""
    import importlib.util
    spec = importlib.util.find_spec("rwkv")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(spec.submodule_search_locations[0]) / WORLD_VOCAB
    return f if f.is_file() else None


def load_tokenizer(source, vocab_rows=None):
    """A World vocab .txt or a tokenizer.json: the file, the directory holding it (or the
    checkpoint), a Hub repo id, or repo:FILENAME. With nothing beside a checkpoint of WORLD_ROWS
    rows, the `rwkv` wheel's World vocabulary."""
    repo_file = hub.split_repo_file(str(source))[1]
    if repo_file and not Path(source).exists():  # one file of a Hub repo
        source = hub.resolve(str(source), allow_patterns=[repo_file])
    source = Path(source)
    if source.is_file() and source.suffix in (".txt", ".json"):
        if source.suffix == ".txt":
            return WorldTokenizer(source)
        return hub.load_tokenizer(source, eos_id=0)
    folder = source.parent if source.is_file() else source  # a .pth: look beside it
    if not folder.is_dir():
        return hub.load_tokenizer(str(source), eos_id=0)
    if (folder / WORLD_VOCAB).exists():
        return WorldTokenizer(folder / WORLD_VOCAB)
    # Pile models: GPT-NeoX, <|endoftext|> = 0 as in the World vocabulary
    if (folder / "tokenizer.json").exists():
        return hub.load_tokenizer(folder, eos_id=0)
    if vocab_rows == WORLD_ROWS and (packaged := packaged_world_vocab()):
        return WorldTokenizer(packaged)
    raise hub.CheckpointError(f"no {WORLD_VOCAB} or tokenizer.json in {folder}: pass --tokenizer "
                              f"FILE (tokenizer= in load_model); the World vocabulary ships in the "
                              f"`rwkv` pip wheel (rwkv/{WORLD_VOCAB})")
