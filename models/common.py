"""What the three architectures share: the write record, edits, the decode cache, the token loop
`recurrent`, the state rebuild, the model-level forward (WriteModel) and generate().

Glossary (one convention for the whole project, docs/DESIGN.md "Conventions")
  B, T, H, K, V  batch, time, state heads, key dim, value dim; r = rank of a write
  S              the per-head matrix state [B,H,K,V], key side first; read o_t = S_tᵀ q_t
  decay D_t      [B,H,Kd] with Kd = 1 (GDN α_t, Mamba-2 exp(Δ_t A))
                 or Kd = K (RWKV-7 w_t, per key channel)
  increment      S_t − D_t ⊙ S_{t−1} = Σ_r inc_k[r] inc_v[r]ᵀ : with the decay it rebuilds
                 every state
  additive write the paper's native write
                 (GDN β_t k_t v_tᵀ, Mamba-2 B_t (Δ_t x_t)ᵀ, RWKV-7 k̃_t v_tᵀ)

A layer's scan (`chunked` in each model file, or `recurrent`: this file's loop over the model's
`step`) returns `(out, final_state, record)` where `record` (the write record) is a dict of
tensors with time on dim 1:
  add_k [B,T,H,r,K], add_v [B,T,H,r,V]   the additive write, as factors
  inc_k [B,T,H,r,K], inc_v [B,T,H,r,V]   the increment, as factors
  decay [B,T,H,Kd]                        the decay applied to S_{t−1}
  query [B,T,H,K]                         the read vector
                                          (GDN q̃ = l2(q)/√K, Mamba-2 C_t, RWKV-7 r_t)
  gain  [B,T,H,V]                         local diagonal gain from o_t to the out-projection
                                          input (norm × gate)
  (plus architecture extras, e.g. GDN beta [B,T,H])
and, when asked, states [B,T,H,K,V] = S_t after the write at t.

An Edit changes the state right after the write at one (layer, head, position) and the model
carries the edited state forward: S'_t = S_t − W_nat + X (replace), S_t + X (add),
S_t − W_nat (delete), with X = Σ_r k[r] v[r]ᵀ. The read at t already sees S'_t. Scans with
edits run as chunked prefix → one edited `step` → chunked suffix (`scan_with_edits`), never a
third code path.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

WRITES = ("additive", "increment")


@dataclass(frozen=True)
class Edit:
    layer: int
    head: int
    pos: int                        # absolute token position (counting the cache's tokens)
    op: str = "replace"             # "replace" | "add" | "delete"
    k: torch.Tensor | None = None   # [r,K] key-side factors of X
    v: torch.Tensor | None = None   # [r,V] value-side factors of X
    write: str | None = None        # the native write replace/delete removes;
                                    # None = the model's default
    batch: int | None = None        # the batch row to edit; None = every row

    def __post_init__(self):
        if self.op not in ("replace", "add", "delete"):
            raise ValueError(f"edit op must be replace, add or delete, not {self.op!r}")
        if (self.op != "delete") != (self.k is not None and self.v is not None):
            needs = "k and v" if self.op != "delete" else "no k, v"
            raise ValueError(f"edit op {self.op!r} needs {needs}")
        if self.write not in (None,) + WRITES:
            raise ValueError(f"edit write must be one of {WRITES}, not {self.write!r}")


@dataclass(frozen=True)
class Capture:
    """Which write sites a forward records: layers (write layers only), heads (None = all), and S_t.
    stop_after: end the forward after the last captured layer (no logits) — extraction needs no
    more."""
    layers: tuple
    heads: tuple | None = None
    states: bool = False
    stop_after: bool = False


class Output(NamedTuple):
    logits: torch.Tensor | None   # [B,T,vocab] fp32 ([B,1,vocab] with logits="last"); None
                                  # with logits="none" or when the forward stopped after the
                                  # last captured layer
    cache: "Cache | None"         # a new cache covering every token seen; the input cache is
                                  # never mutated
    captures: dict                # {layer: write record}, heads restricted to Capture.heads


@dataclass
class Cache:
    """Decode cache: pos = tokens seen;
    layers[i] = {name: tensor with batch on dim 0} for layer i."""
    pos: int = 0
    layers: list = field(default_factory=list)

    def map(self, fn) -> "Cache":
        return Cache(self.pos, [{k: fn(v) for k, v in layer.items()} for layer in self.layers])

    def copy(self) -> "Cache":
        return self.map(torch.Tensor.clone)

    def repeat(self, n: int) -> "Cache":
        """Each batch row n times (row-major), e.g. to run n edit conditions from one prefix."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, rows) -> "Cache":
        return self.map(lambda t: t[rows].clone())


# ------------------------------------------------------------------------------------------------
# The edit itself and the scan driver that applies it

def outer(k, v):
    """Σ_r k[..., r, :] ⊗ v[..., r, :]  ->  [..., K, V]."""
    return torch.einsum("...rk,...rv->...kv", k, v)


def apply_edits(S, record_t, edits, default_write):
    """S [B,H,K,V] right after the write at t; record_t the step's write record, no time axis."""
    S = S.clone()
    for e in edits:
        rows = slice(None) if e.batch is None else slice(e.batch, e.batch + 1)
        if e.op in ("replace", "delete"):
            kind = {"additive": "add", "increment": "inc"}[e.write or default_write]
            key = record_t[f"{kind}_k"][rows, e.head]                         # [B|1,r,K]
            value = record_t[f"{kind}_v"][rows, e.head]                       # [B|1,r,V]
            S[rows, e.head] -= outer(key, value)
        if e.op in ("replace", "add"):
            S[rows, e.head] += outer(e.k.to(S), e.v.to(S))
    return S


def decay_exp(x):
    """exp of summed log-decays x ≤ 0, clamped to [−87, 0]. Below −87 fp32's exp is subnormal
    (< 2e-38, nothing at fp32 precision) and slow on a CPU (see docs/PERFORMANCE.md); above 0 sit
    only the masked entries of a segment sum (the caller's tril zeroes them), kept finite so that
    no gradient meets inf."""
    return x.clamp(-87.0, 0.0).exp()


def causal_conv(x, weight, bias=None, prev=None):
    """The short depthwise causal conv of GDN and Mamba-2 over time, channels last.

    x [B,T,C]; weight [C,1,W] (nn.Conv1d's); prev [B,W−1,C] the inputs before x (None: zeros at
    the start). Returns (out [B,T,C], the last W−1 inputs [B,W−1,C] for the next call). Run as a
    conv2d on a channels-last view, for speed (see docs/PERFORMANCE.md), and the output needs no
    transpose.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    prev = x.new_zeros(B, W - 1, C) if prev is None else prev.to(x)
    xp = torch.cat([prev, x], dim=1)                                          # [B,W−1+T,C]
    out = torch.nn.functional.conv2d(xp.transpose(1, 2)[:, :, None], weight[:, :, None], bias,
                                     groups=C)
    return out[:, :, 0].transpose(1, 2), xp[:, T:].clone()                   # [B,T,C], [B,W−1,C]


def time_slice(inputs: dict, a: int, b: int) -> dict:
    return {k: x[:, a:b] for k, x in inputs.items()}


def cat_time(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}


def scan_with_edits(chunked, step, inputs: dict, state, edits, t0: int, default_write, **kw):
    """Run one layer's scan over inputs [B,T,...] starting at absolute position t0 with edits at
    some positions.

    chunked(inputs, state, **kw) -> (out, state, record) runs the stretches between edits;
    step(state, inputs_t, edit_fn, **kw) -> (state, out_t, record_t) runs each edited position,
    where edit_fn(S_t, record_t) -> S'_t is called between the write and the read.
    """
    T = next(iter(inputs.values())).shape[1]
    at = {}
    for e in edits:
        if not t0 <= e.pos < t0 + T:
            raise ValueError(f"edit at position {e.pos} is outside this forward's positions "
                             f"{t0}..{t0 + T - 1}")
        at.setdefault(e.pos - t0, []).append(e)
    outs, parts, start = [], [], 0
    for t in sorted(at) + [T]:
        if t > start:
            o, state, record = chunked(time_slice(inputs, start, t), state, **kw)
            outs.append(o)
            parts.append(record)
        if t == T:
            break
        x_t = {k: x[:, t] for k, x in inputs.items()}

        def edit_fn(S, record_t, here=at[t]):
            return apply_edits(S, record_t, here, default_write)

        state, o_t, record_t = step(state, x_t, edit_fn, **kw)
        outs.append(o_t.unsqueeze(1))
        parts.append({k: x.unsqueeze(1) for k, x in record_t.items()})
        start = t + 1
    if len(outs) == 1:  # no edit here: joining one part would only copy every record tensor
        return outs[0], state, parts[0]
    return torch.cat(outs, dim=1), state, cat_time(parts)


def recurrent(step, inputs: dict, state=None, keep_states=False, **kw):
    """The token loop over an architecture's `step`: the naive path, the reference for the rest.

    inputs {name: [B,T,...]}; step(state, inputs_t, **kw) -> (state, out_t, record_t).
    Returns (out [B,T,...], final state [B,H,K,V], the write record with time on dim 1, plus
    states [B,T,H,K,V] with keep_states)."""
    T = next(iter(inputs.values())).shape[1]
    outs, parts, states = [], [], []
    for t in range(T):
        state, o, record_t = step(state, {n: x[:, t] for n, x in inputs.items()}, **kw)
        outs.append(o)
        parts.append(record_t)
        states.append(state)
    record = {n: torch.stack([part[n] for part in parts], dim=1) for n in parts[0]}
    if keep_states:
        record["states"] = torch.stack(states, dim=1)                          # [B,T,H,K,V]
    return torch.stack(outs, dim=1), state, record


def walk_states(inc_k, inc_v, decay, initial_state=None, T=None):
    """Yields (t, S_t [B,H,K,V]) for t < T (default all), the states rebuilt from their factors:
    S_t = decay_t ⊙ S_{t−1} + Σ_r inc_k inc_vᵀ in fp32. S_t is updated in place (two kernels a
    step, see docs/PERFORMANCE.md): copy what you keep.

    inc_k [B,T,H,r,K], inc_v [B,T,H,r,V], decay [B,T,H,Kd], on the device the states go to."""
    B, T_all, H, r, K = inc_k.shape
    V = inc_v.shape[-1]
    k = inc_k.float().permute(1, 0, 2, 4, 3).reshape(T_all, B * H, K, r)       # [T,B·H,K,r]
    v = inc_v.float().transpose(0, 1).reshape(T_all, B * H, r, V)              # [T,B·H,r,V]
    a = decay.float().transpose(0, 1).reshape(T_all, B * H, -1, 1)             # [T,B·H,Kd,1]
    if initial_state is None:
        S = inc_k.new_zeros(B * H, K, V, dtype=torch.float32)                  # [B·H,K,V]
    else:  # a copy: the walk updates S in place and the caller's state may be a cache's
        S = initial_state.float().reshape(B * H, K, V).clone()
    for t in range(T_all if T is None else T):
        S.mul_(a[t]).baddbmm_(k[t], v[t])     # S_t = decay_t ⊙ S_{t−1} + Σ_r inc_k[r] inc_v[r]ᵀ
        yield t, S.view(B, H, K, V)


def rebuild_states(inc_k, inc_v, decay, initial_state=None):
    """Every state of walk_states kept: inc_k [B,T,H,r,K], inc_v [B,T,H,r,V], decay [B,T,H,Kd]
    -> states [B,T,H,K,V] fp32 (no autograd through it: the walk is in place)."""
    B, T, H, _, K = inc_k.shape
    out = inc_k.new_empty(B, T, H, K, inc_v.shape[-1], dtype=torch.float32)
    for t, S in walk_states(inc_k, inc_v, decay, initial_state):
        out[:, t] = S
    return out


def rms_norm_jacobian(o, v, eps):
    """An RMS norm's exact local Jacobian at o [..,V], divided by its diagonal gain, applied to
    value factors v [..,r,V]: v − ô⟨ô, v⟩ with ô = o / √(V (mean o² + eps)).
    -> [..,r,V]"""
    ms = o.pow(2).mean(-1, keepdim=True) + eps                                # [..,1]
    o = (o * torch.rsqrt(o.shape[-1] * ms))[..., None, :]                     # [..,1,V]  ô
    return v - (v * o).sum(-1, keepdim=True) * o


# ------------------------------------------------------------------------------------------------
# The model-level forward, written once: embedding -> layers -> final norm -> logits

IMPLS = ("chunked", "recurrent")


class WriteModel(torch.nn.Module):
    """Base of the three model classes: the layer loop, the checks, generate(). Subclasses set
      arch          "qwen35" | "mamba2" | "rwkv7" (the loader's name)
      write_layers  the layers that have a matrix state
                    (GDN layers for Qwen3.5; all layers otherwise)
      n_heads       state heads per write layer;  state_shape (K, V)
      write_rank    {"additive": r, "increment": r};  default_write "additive" | "increment"
      layer_kind    a word for the error message, e.g. "Gated DeltaNet"
      state_key     the name of a write layer's state S in its cache entry
      READ_PATH     a paragraph for the report: the read, the head norm, what the closed form
                    leaves out
      PAPER_FIGURES the paper's reported numbers for this architecture where they differ from its
                    Qwen3.5 main figures, keyed like eval.py's PAPER ({} for Qwen3.5)
      layers_key, final_norm_key  the Hub key prefixes of the layers and of the norm that feeds
                    the unembedding (e.g. "model.layers", "model.norm")
      out_proj_key  the key of a write layer's out-projection inside the layer
                    (e.g. "linear_attn.out_proj")
    and provide
      embed(ids, t0) -> (h [B,T,D], shared): the residual stream and what every layer reads (a
                    dict the layers may add to, e.g. RWKV-7's v_first)
      each layer    layer(h, past, shared, t0, edits, impl, want_record)
                    -> (h, this layer's new cache entry, its write record or None)
      head_norm_eps, norm_jacobian(o, v, eps), transport_key(key, record_s): what the closed
                    form needs (writesae.shift_predictions)
    From the keys this class gives blocks (the layers in order), final_norm, head_out_proj and
    lm_head_weight (the lm_head module's weight; Mamba-2, whose tied head is no module,
    overrides it).
    """

    arch = ""
    layer_kind = "write"
    default_write = "additive"
    READ_PATH = ""
    PAPER_FIGURES: dict[str, str] = {}

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.get_submodule(self.layers_key)

    @property
    def final_norm(self) -> torch.nn.Module:
        return self.get_submodule(self.final_norm_key)

    def head_out_proj(self, layer: int, head: int) -> torch.Tensor:
        """The head's columns of the layer's out-projection [D,V]: where its read o_t enters."""
        self.check_site(layer, head)
        V = self.state_shape[1]
        out_proj = self.blocks[layer].get_submodule(self.out_proj_key)
        return out_proj.weight[:, head * V:(head + 1) * V]                    # [D,V]

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight                                            # [vocab,D]

    @property
    def sae_rank(self) -> int:
        """The default rank of the SAE's atoms: the rank of the default write."""
        return self.write_rank[self.default_write]

    def forward(self, ids, cache=None, use_cache=False, edits=(), capture=None, impl="chunked",
                logits="all") -> Output:
        """ids [B,T] -> Output. A cache continues from cache.pos (never mutated); use_cache returns
        a new one; edits apply at absolute positions; capture records writes (and S_t) of some
        layers."""
        self.check_forward(ids, cache, edits, capture, impl)
        t0, keep = (0, use_cache) if cache is None else (cache.pos, True)
        stop = None
        if capture is not None and capture.stop_after and capture.layers:
            stop = max(capture.layers)                        # the forward ends there: no logits
        h, shared = self.embed(ids, t0)                                       # [B,T,D]
        layers, captures = [], {}
        for i, layer in enumerate(self.blocks):
            past = {} if cache is None else cache.layers[i]
            mine = [e for e in edits if e.layer == i]
            want = capture is not None and i in capture.layers
            h, new, record = layer(h, past, shared, t0, mine, impl, want)
            if keep:  # else a layer's state is garbage as soon as the next layer runs
                layers.append(new)
            if want:
                captures[i] = self.captured(record, past.get(self.state_key), capture, bool(mine))
            del new, record  # not held while the next layer runs (a layer's largest extra)
            if i == stop:
                return Output(None, None, captures)
        W = self.lm_head_weight()                                             # [vocab,D]
        h = self.logit_rows(h, logits)
        h = None if h is None else self.final_norm(h).to(W.dtype)  # the residual is freed first
        out = None if h is None else torch.nn.functional.linear(h, W).float()  # [B,T|1,vocab]
        return Output(out, Cache(t0 + ids.shape[1], layers) if keep else None, captures)

    def check_forward(self, ids, cache, edits, capture, impl):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, not {impl!r}")
        if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"ids must be a [B,T] tensor of token ids, not {ids.dtype} "
                             f"{list(ids.shape)}")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {len(self.blocks)}")
        self.check_edits(edits)
        self.check_capture(capture)

    def check_site(self, layer: int, head: int | None = None):
        if layer not in self.write_layers:
            raise ValueError(f"layer {layer} is not a {self.layer_kind} layer; "
                             f"{self.layer_kind} layers: {list(self.write_layers)}")
        if head is not None and not 0 <= head < self.n_heads:
            raise ValueError(f"head {head} is out of range: layer {layer} has heads "
                             f"0..{self.n_heads - 1}")

    def check_edits(self, edits):
        for e in edits:
            self.check_site(e.layer, e.head)
            K, V = self.state_shape
            if e.k is None:
                continue
            if e.k.shape[-1] != K or e.v.shape[-1] != V or e.k.shape[0] != e.v.shape[0]:
                raise ValueError(f"edit factors k {list(e.k.shape)}, v {list(e.v.shape)} do not "
                                 f"fit a [{K},{V}] state (want [r,{K}] and [r,{V}])")

    def check_capture(self, capture):
        if capture is not None:
            for layer in capture.layers:
                self.check_site(layer)
            for head in capture.heads or ():
                self.check_site(capture.layers[0], head)

    @staticmethod
    def logit_rows(h, logits: str):
        """The final hidden states the head is applied to: logits="all" | "last" (generation) |
        "none" (a cache walk that reads no prediction) -> h [B,T|1,D] or None."""
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        return {"all": h, "last": h[:, -1:], "none": None}[logits]

    @staticmethod
    def captured(record, initial_state, capture, edited):
        """One layer's write record restricted to capture.heads, with the states rebuilt from the
        increments on request."""
        kept = slice(None) if capture.heads is None else list(capture.heads)  # the heads kept
        out = {n: x[:, :, kept] for n, x in record.items()}
        if capture.states:
            if edited:  # an edit moves S_t off the increments' path: rebuilt states would be wrong
                raise ValueError("capture.states with an edit in the same layer is not supported: "
                                 "capture the states in an unedited forward")
            S0 = None if initial_state is None else initial_state[:, kept]
            out["states"] = rebuild_states(out["inc_k"], out["inc_v"], out["decay"],
                                           S0)                                # [B,T,h,K,V]
        return out

    @torch.no_grad()
    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 edits=(), cache=None, seed: int | None = None):
        """Greedy (temperature 0) or sampled continuation of ids [B,T0]; edits at absolute
        positions apply wherever they fall (prompt or decoded tokens).
        Returns [B, T0 + max_new_tokens]."""
        gen = None if seed is None else torch.Generator(device=ids.device).manual_seed(seed)
        out = [ids]
        pending = list(edits)

        def run(x, cache):
            lo = 0 if cache is None else cache.pos
            hi = lo + x.shape[1]
            due = [e for e in pending if lo <= e.pos < hi]  # the edits inside this call's tokens
            return self(x, cache=cache, use_cache=True, edits=due, logits="last")

        res = run(ids, cache)
        for i in range(max_new_tokens):
            logits = res.logits[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                res = run(nxt, res.cache)
        return torch.cat(out, dim=1)
