"""Qwen3.5 (Qwen/Qwen3.5-0.8B, -4B): Gated DeltaNet (GDN) layers + gated full attention + SwiGLU
MLP.

Glossary (paper ↔ code ↔ config.json `text_config`)
  B, T           batch, time;  D = hidden_size
  H              GDN state heads = value heads Hv = linear_num_value_heads;
                 Hk = linear_num_key_heads key heads, v-head h reads k-head h // (Hv/Hk)
  K, V           linear_key_head_dim d_k, linear_value_head_dim d_v;  C = chunk length (64)
  S              per-head state [B,H,K,V] fp32;  S_t = α_t S_{t−1} + k_t δ_tᵀ,  read o_t = S_tᵀ q̃_t
  g, α           log-decay g_t = −exp(A_log)·softplus(a_t + dt_bias) ≤ 0, α_t = e^{g_t}
  beta (β)       write strength σ(b_t)
  k, q̃           l2(k_t);  q̃_t = l2(q_t)·K^{-1/2}  (after the short causal conv + SiLU)
  δ              δ_t = β_t (v_t − α_t S_{t−1}ᵀ k_t): the delta-rule correction
  record         the write record (models/common.py):
                 additive (the paper's ∆nat) = β_t k_t v_tᵀ  -> add_k = k, add_v = β v   (rank 1)
                 increment S_t − α_t S_{t−1} = k_t δ_tᵀ        -> inc_k = k, inc_v = δ    (rank 1)
                 decay α [B,T,H,1], query q̃, gain = w ⊙ silu(z) / rms(o) (the gated norm's local
                 diagonal gain, so that the out-projection input is gain ⊙ o), extra beta [B,T,H]
  γ, Γ           in `chunked`: cum_g = γ_i = Σ_{s≤i} g_s inside a chunk,
                 pair_decay = Γ_ij = exp(γ_i − γ_j) for j ≤ i

Cache.layers[i]: GDN {"conv": [B,W−1,conv_dim] last conv inputs, "state": S};
attention {"k","v": [B,Hkv,P,hd]}.
Reference: transformers 5.24 models/qwen3_5/modeling_qwen3_5.py (the GDN recurrence is the
paper's Eq. (2); docs/DESIGN.md "The native write per architecture").
"""

import functools
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hub
from . import common
from .common import WriteModel, causal_conv, decay_exp, rms_norm_jacobian, scan_with_edits


@dataclass
class Qwen35Config:
    vocab_size: int = 248320
    hidden_size: int = 1024                  # D
    intermediate_size: int = 3584            # SwiGLU width
    layer_types: tuple = ("linear_attention",) * 3 + ("full_attention",)  # one entry per layer
    num_attention_heads: int = 8             # Hq; q_proj also emits one gate per query channel
    num_key_value_heads: int = 2             # Hkv (GQA)
    head_dim: int = 256                      # attention head dim hd
    linear_num_key_heads: int = 16           # Hk
    linear_num_value_heads: int = 16         # Hv = H, the state heads
    linear_key_head_dim: int = 128           # K
    linear_value_head_dim: int = 128         # V
    linear_conv_kernel_dim: int = 4          # W, the short causal conv
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25      # RoPE on the first 0.25·hd dims only
    tie_word_embeddings: bool = True         # lm_head = embed_tokens (no lm_head.weight on disk)
    eos_token_id: int | None = None

    @classmethod
    def from_hf(cls, config: dict) -> "Qwen35Config":
        """The real multimodal config.json (nested text_config) or the text-only one transformers
        writes."""
        d = config.get("text_config", config)
        # rope_theta / partial_rotary_factor sit in rope_parameters (transformers 5) or at top
        # level (files written by older transformers)
        d = {**d, **(d.get("rope_parameters") or {})}
        bad = sorted(set(d.get("layer_types", ())) - {"linear_attention", "full_attention"})
        if bad:
            raise hub.CheckpointError(f"config.json: unknown layer type {bad[0]!r}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["layer_types"] = tuple(kw.get("layer_types", cls.layer_types))
        tied = config.get("tie_word_embeddings", False)
        kw["tie_word_embeddings"] = d.get("tie_word_embeddings", tied)
        eos = d.get("eos_token_id", config.get("eos_token_id"))
        kw["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
        return cls(**kw)

    def to_hf(self) -> dict:
        """config.json as transformers' Qwen3_5ForCausalLM.save_pretrained writes it."""
        d = asdict(self)
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta"),
                "partial_rotary_factor": d.pop("partial_rotary_factor")}
        return {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **d,
                "layer_types": list(self.layer_types), "num_hidden_layers": len(self.layer_types),
                "rope_parameters": rope, "hidden_act": "silu", "attention_bias": False}


# ------------------------------------------------------------------------------------------------
# The Gated DeltaNet recurrence, the paper's Eq. (2). inputs: q [B,T,H,K] (= q̃), k [B,T,H,K],
# v [B,T,H,V], g [B,T,H], beta [B,T,H]

def step(state, x_t: dict, edit_fn=None):
    """One token: decay, delta-rule write, (edit), read. state [B,H,K,V] fp32 or None (= zeros)."""
    q, k, v = x_t["q"], x_t["k"], x_t["v"]                          # [B,H,K] ×2, [B,H,V]
    g, beta = x_t["g"], x_t["beta"]                                 # [B,H] each
    if state is None:
        state = k.new_zeros(*k.shape, v.shape[-1])
    alpha = g.exp()                                                 # [B,H]
    # Eq. (2): S_t = α_t S_{t−1} + k_t δ_tᵀ,  δ_t = β_t (v_t − α_t S_{t−1}ᵀ k_t)
    S = alpha[..., None, None] * state                              # [B,H,K,V]  α_t S_{t−1}
    delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))   # [B,H,V]  δ_t
    S = S + k[..., :, None] * delta[..., None, :]                   # write = k_t ⊗ δ_t
    record = {"add_k": k[:, :, None],                               # [B,H,1,K]
              "add_v": (beta[..., None] * v)[:, :, None],           # [B,H,1,V]
              "inc_k": k[:, :, None], "inc_v": delta[:, :, None],
              "decay": alpha[..., None], "query": q, "beta": beta}
    if edit_fn is not None:
        S = edit_fn(S, record)
    out = torch.einsum("bhkv,bhk->bhv", S, q)                       # [B,H,V]  o_t = S_tᵀ q̃_t
    return S, out, record


# the token loop over step: recurrent(inputs, state=None, keep_states=False)
recurrent = functools.partial(common.recurrent, step)


def ut_transform(kc, vc, bc, cum_decay, pair_decay):
    """With A = I + strict_lower(β_i k_i·k_j Γ_ij): U = A⁻¹ β V and W = A⁻¹ β e^γ K, so that the
    loop's δ_t = U_t − W_t S_chunk_start (every erase inside the chunk folded into A).

    kc [B,H,N,C,K], vc [B,H,N,C,V], bc = β and cum_decay = e^γ [B,H,N,C], pair_decay = Γ
    [B,H,N,C,C] -> U [B,H,N,C,V], W [B,H,N,C,K]. A⁻¹ is solved for and then multiplied, and β
    and e^γ scale A's rows and A⁻¹'s columns (C × C), for speed (see docs/PERFORMANCE.md)."""
    C = kc.shape[-2]
    A = (kc @ kc.transpose(-1, -2)) * (pair_decay * bc[..., :, None])   # diagonal ignored
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    A_inv = torch.linalg.solve_triangular(A, eye, upper=False,
                                          unitriangular=True)       # [B,H,N,C,C]
    del A
    U = (A_inv * bc[..., None, :]) @ vc                             # [B,H,N,C,V] A⁻¹ diag(β) V
    W = (A_inv * (bc * cum_decay)[..., None, :]) @ kc               # [B,H,N,C,K] A⁻¹ diag(β e^γ) K
    return U, W


def chunked(inputs: dict, state=None, chunk_size=64):
    """The same scan in chunks of C tokens (WY/UT form): matmuls inside a chunk, a loop over T/C
    chunks only."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g, beta = inputs["g"], inputs["beta"]
    (B, T, H, K), V = k.shape, v.shape[-1]
    C = min(chunk_size, T)                                          # a short input is not padded
    N = -(-T // C)                                                  # chunks, the last one padded

    def to_chunks(x):
        """[B,T,H,...] -> [B,H,N,C,...], a contiguous copy; padded tokens are inert
        (k = q = 0, g = 0, β = 0)."""
        if N * C != T:  # F.pad copies even when it pads nothing
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
        x = x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)
        return x.clone(memory_format=torch.contiguous_format)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)          # [B,H,N,C,K|V]
    gc, bc = to_chunks(g)[..., 0], to_chunks(beta)[..., 0]         # [B,H,N,C] each
    # 1. γ_i = Σ_{s≤i} g_s: log of the loop's product of α from the chunk start through token i
    cum_g = gc.cumsum(-1)                                           # [B,H,N,C]  γ
    cum_decay = decay_exp(cum_g)                                    # [B,H,N,C]  e^γ
    # 2. Γ_ij = exp(γ_i − γ_j) for j ≤ i: the decay a write at j has suffered when read at i
    pair_decay = decay_exp(cum_g[..., :, None] - cum_g[..., None, :]).tril()   # [B,H,N,C,C]  Γ
    # 3. the UT transform: δ_t = U_t − W_t S_chunk_start
    U, W = ut_transform(kc, vc, bc, cum_decay, pair_decay)          # [B,H,N,C,V], [B,H,N,C,K]
    del vc
    # 4. decays applied once, outside the chunk loop: (Q Kᵀ ⊙ Γ) reads this chunk's writes,
    #    k e^{γ_C − γ} carries each write to the chunk end; e^γ scales the chunk-start read
    #    inside the loop
    intra = (qc @ kc.transpose(-1, -2)) * pair_decay                # [B,H,N,C,C]
    k_end = kc * decay_exp(cum_g[..., -1:] - cum_g)[..., None]      # [B,H,N,C,K]
    a_end = cum_decay[..., -1, None, None]                          # [B,H,N,1,1]
    del pair_decay, kc
    # 5. the only sequential part, over chunks: δ = U − W S (exactly the loop's δ_t, the
    #    increment's value factor), the read
    #    o_i = e^γ_i S_startᵀ q̃_i + Σ_{j≤i} (q̃_i·k_j Γ_ij) δ_j,
    #    then S ← α_chunk S + Σ_t k_end,t δ_tᵀ
    S = state.float() if state is not None else k.new_zeros(B, H, K, V)
    out = k.new_empty(B, N * C, H, V)                               # the caller's layout
    delta = k.new_empty(B, H, N * C, V)                             # returned as a [B,T,H,V] view
    for n in range(N):
        d = U[:, :, n] - W[:, :, n] @ S                             # [B,H,C,V]
        o = (qc[:, :, n] @ S) * cum_decay[:, :, n, :, None] + intra[:, :, n] @ d
        out[:, n * C:(n + 1) * C] = o.transpose(1, 2)
        delta[:, :, n * C:(n + 1) * C] = d
        S = a_end[:, :, n] * S + k_end[:, :, n].transpose(-1, -2) @ d
    del U, W, qc, intra, k_end
    record = {"add_k": k[:, :, :, None], "add_v": (beta[..., None] * v)[:, :, :, None],
              "inc_k": k[:, :, :, None], "inc_v": delta.transpose(1, 2)[:, :T, :, None],
              "decay": g.exp()[..., None], "query": q, "beta": beta}
    return out[:, :T], S, record


SCANS = {"chunked": chunked, "recurrent": recurrent}


# ------------------------------------------------------------------------------------------------
# Layers, named like the Hub keys

def l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: x / rms(x) · (1 + w), in fp32 (the weight is stored as an offset
    from 1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * rstd * (1 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """Per-head w ⊙ (o / rms(o)) ⊙ silu(z) with a plain weight; returns it and its local gain
    w ⊙ silu(z) / rms(o)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, o, z):                                                  # [B,T,H,V] fp32 each
        rstd = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)        # [B,T,H,1]
        gain = self.weight.float() * F.silu(z) * rstd
        return o * gain, gain


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        D, Hk, H = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
        K, V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.Hk, self.H, self.K, self.V = Hk, H, K, V
        self.conv_dim = 2 * Hk * K + H * V                                    # channels q | k | v
        self.in_proj_qkv = nn.Linear(D, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(D, H * V, bias=False)
        self.in_proj_b = nn.Linear(D, H, bias=False)
        self.in_proj_a = nn.Linear(D, H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.linear_conv_kernel_dim,
                                groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
        self.norm = GatedRMSNorm(V, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(H * V, D, bias=False)

    def scan_inputs(self, x, past):
        """x [B,T,D] -> the scan's inputs dict (fp32) and the new conv state."""
        B, T, _ = x.shape
        Hk, H, K, V = self.Hk, self.H, self.K, self.V
        c, conv = causal_conv(self.in_proj_qkv(x), self.conv1d.weight,
                              prev=past.get("conv"))                  # [B,T,conv_dim]
        c = F.silu(c).float()
        q, k, v = c.split([Hk * K, Hk * K, H * V], -1)
        q = l2norm(q.reshape(B, T, Hk, K)) * K ** -0.5                      # [B,T,Hk,K]
        k = l2norm(k.reshape(B, T, Hk, K))                                   # [B,T,Hk,K]
        if H != Hk:  # value head h reads and writes with key head h // (H/Hk)
            q = q.repeat_interleave(H // Hk, 2)                              # [B,T,H,K]
            k = k.repeat_interleave(H // Hk, 2)
        a = self.in_proj_a(x).float() + self.dt_bias.float()
        g = -self.A_log.float().exp() * F.softplus(a)                        # [B,T,H]
        beta = torch.sigmoid(self.in_proj_b(x).float())                      # [B,T,H]
        return {"q": q, "k": k, "v": v.reshape(B, T, H, V), "g": g, "beta": beta}, conv

    def forward(self, x, past: dict, t0: int, edits, impl: str):
        B, T, _ = x.shape
        inputs, conv = self.scan_inputs(x, past)
        o, S, record = scan_with_edits(SCANS[impl], step, inputs, past.get("state"), edits, t0,
                                       "additive")
        z = self.in_proj_z(x).view(B, T, self.H, self.V).float()
        y, record["gain"] = self.norm(o, z)                                  # [B,T,H,V] each
        out = self.out_proj(y.to(x.dtype).reshape(B, T, -1))                 # [B,T,D]
        return out, {"conv": conv, "state": S}, record


def rope(x, cos, sin):
    """Rotate the first rd = cos.shape[-1] dims of each head (rotate-half pairs (i, i + rd/2));
    x [B,T,h,hd]."""
    rd = cos.shape[-1]
    r1, r2, rest = x[..., : rd // 2], x[..., rd // 2: rd], x[..., rd:]
    return torch.cat([x[..., :rd] * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)


class Attention(nn.Module):
    """Gated full attention: per-head query/gate split, q/k norm, partial RoPE, GQA, output gated
    by σ(gate)."""

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.Hq, self.Hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(D, self.Hq * hd * 2, bias=False)  # per head: [query hd | gate hd]
        self.k_proj = nn.Linear(D, self.Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, self.Hkv * hd, bias=False)
        self.o_proj = nn.Linear(self.Hq * hd, D, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, past: dict, cos, sin):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.Hq, 2 * self.hd).chunk(2, -1)  # [B,T,Hq,hd] each
        q = rope(self.q_norm(q), cos, sin).transpose(1, 2)                    # [B,Hq,T,hd]
        k = self.k_norm(self.k_proj(x).view(B, T, self.Hkv, self.hd))
        k = rope(k, cos, sin).transpose(1, 2)                                 # [B,Hkv,T,hd]
        v = self.v_proj(x).view(B, T, self.Hkv, self.hd).transpose(1, 2)      # [B,Hkv,T,hd]
        if "k" in past:
            k, v = torch.cat([past["k"], k], 2), torch.cat([past["v"], v], 2)  # [B,Hkv,P+T,hd]
        P = k.shape[2] - T
        # with P cached tokens query i sees keys 0..P+i (SDPA's is_causal would align the mask
        # top-left)
        mask = None if P == 0 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0,
                                           enable_gqa=True)                   # [B,Hq,T,hd]
        o = o.transpose(1, 2).reshape(B, T, -1)                               # [B,T,Hq·hd]
        o = o * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(o), {"k": k, "v": v}


class MLP(nn.Module):
    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen35Config, kind: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, past, shared, t0, edits, impl, want_record):
        """-> (h, this layer's new cache entry, the GDN write record or None). A GDN layer's norm
        computes the record's gain for its own output, so want_record changes nothing here."""
        x = self.input_layernorm(h)
        record = None
        if hasattr(self, "linear_attn"):
            y, new, record = self.linear_attn(x, past, t0, edits, impl)
        else:
            y, new = self.self_attn(x, past, shared["cos"], shared["sin"])
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h)), new, record


class TextModel(nn.Module):
    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind) for kind in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen35ForCausalLM(WriteModel):
    arch, layer_kind, default_write = "qwen35", "Gated DeltaNet", "additive"
    write_rank = {"additive": 1, "increment": 1}
    state_key = "state"
    layers_key, final_norm_key = "model.layers", "model.norm"
    out_proj_key = "linear_attn.out_proj"
    READ_PATH = (
        "GDN: read o = Sᵀq̃ (q̃ = l2(q)/√K); gain = w ⊙ silu(z)/rms(o) (gated RMSNorm, norm then "
        "gate); out_proj. Transport α(I − βk̂k̂ᵀ): the delta-rule erase is what the no-fit G = Πα "
        "drops; 'exact' also uses the gated RMSNorm's full local Jacobian.")

    def __init__(self, cfg: Qwen35Config):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # transformers' initializer_range; norms, conv, A_log, dt_bias keep their own init
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.write_layers = tuple(i for i, kind in enumerate(cfg.layer_types)
                                  if kind == "linear_attention")
        self.n_heads = cfg.linear_num_value_heads
        self.state_shape = (cfg.linear_key_head_dim, cfg.linear_value_head_dim)

    def rotary(self, pos):
        """cos, sin [T,1,rd] for absolute positions pos [T] (text-only M-RoPE is exactly 1-D
        RoPE)."""
        cfg = self.config
        rd = int(cfg.head_dim * cfg.partial_rotary_factor)
        dims = torch.arange(0, rd, 2, device=pos.device, dtype=torch.float)
        inv_freq = cfg.rope_theta ** -(dims / rd)                              # [rd/2]
        ang = (pos.float()[:, None] * inv_freq).repeat(1, 2)[:, None]       # [T,1,rd]
        dtype = self.model.embed_tokens.weight.dtype
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def embed(self, ids, t0):
        cos, sin = self.rotary(torch.arange(t0, t0 + ids.shape[1], device=ids.device))
        return self.model.embed_tokens(ids), {"cos": cos, "sin": sin}

    @property
    def head_norm_eps(self):
        return self.config.rms_norm_eps

    @staticmethod
    def norm_jacobian(o, v, eps):
        """The gated RMSNorm's local Jacobian at the read o [..,V] over its diagonal gain, on
        v [..,r,V]."""
        return rms_norm_jacobian(o, v, eps)

    @staticmethod
    def transport_key(key, record_s):
        """key [..,r,K] <- M_s key with M_s = α_s (I − β_s k̂_s k̂_sᵀ): the delta rule's decay and
        erase. record_s: the write record at s, head axis removed, no time axis."""
        k = record_s["add_k"][..., :1, :]                                     # [..,1,K] unit key
        erase = record_s["beta"][..., None, None] * (key * k).sum(-1, keepdim=True) * k
        return record_s["decay"][..., None, :] * (key - erase)


# ------------------------------------------------------------------------------------------------
# Checkpoints

# the multimodal wrapper (Qwen3_5ForConditionalGeneration)
RENAME = {"model.language_model.": "model."}
# the vision tower and the multi-token-prediction head: not used for text
SKIP = ("model.visual.", "mtp.")


def from_pretrained(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """A checkpoint directory (text-only or the multimodal wrapper, single file or sharded)
    -> (model, tokenizer). Without tokenizer.json and tokenizer=None the tokenizer is a
    hub.MissingTokenizer: ids work, text raises."""
    path = Path(path)
    raw = hub.read_config(path)
    if raw is None:
        raise hub.CheckpointError(f"no config.json in {path}")
    cfg = Qwen35Config.from_hf(raw)
    sd = {}
    for name, t in hub.read_state_dict(path).items():
        if name.startswith(SKIP):
            continue
        for old, new in RENAME.items():
            name = new + name[len(old):] if name.startswith(old) else name
        sd[name] = t
    tied = cfg.tie_word_embeddings
    if tied:  # lm_head.weight is tolerated if present; the tie wins, as in transformers
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Qwen35ForCausalLM(cfg)
    expected = {n: p.shape for n, p in model.state_dict().items()
                if not (tied and n == "lm_head.weight")}
    hub.check_tensors(sd, expected, str(path))
    # A_log stays fp32 (as stored on the Hub): g = −exp(A_log)·softplus(·) is too sensitive for bf16
    sd = {n: t.to(device, torch.float32 if n.endswith("A_log") else dtype) for n, t in sd.items()}
    if tied:
        sd = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    model.load_state_dict(sd, assign=True)
    if tied:  # assign=True made two Parameters; make them one again
        model.lm_head.weight = model.model.embed_tokens.weight
    if tokenizer is not None or (path / "tokenizer.json").exists():
        tok = hub.load_tokenizer(path if tokenizer is None else tokenizer, eos_id=cfg.eos_token_id)
    else:
        tok = hub.MissingTokenizer(f"no tokenizer.json in {path}: pass tokenizer= (a "
                                   f"tokenizer.json, a directory or a Hub repo id)",
                                   cfg.eos_token_id, cfg.vocab_size)
    return model.eval(), tok


def save_pretrained(model: Qwen35ForCausalLM, path, dtype=torch.float16):
    """config.json + model.safetensors as transformers' Qwen3_5ForCausalLM writes them (A_log
    kept fp32, as on the Hub; a tied lm_head is not stored)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    tied = model.config.tie_word_embeddings
    sd = {n: t.detach().to("cpu", torch.float32 if n.endswith("A_log") else dtype).contiguous()
          for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
