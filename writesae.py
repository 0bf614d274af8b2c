"""WriteSAE: sparse autoencoders whose decoder atoms are low-rank matrices shaped like a recurrent
write.

Glossary (paper → code; docs/DESIGN.md "1. Conventions" and "3. The SAE")
  S_t          a per-head state [K,V] after the write at t (key side first). Batches are [h,B,K,V]:
               h independent SAEs (several heads of one layer, trained together) × B states
  M            the paper's centring mean = b_dec [h,K,V], initialised to the mean training state,
               subtracted before encoding and added after decoding, then learned (the released
               code's bias)
  (v_i, w_i)   atom i's key-side and value-side factors = (dec_k[i], dec_v[i]) [r,K], [r,V];
               the atom is A_i = Σ_r dec_k[i,r] ⊗ dec_v[i,r], every factor unit-norm
  a            the code [h,B,n] (`codes`): ≥ 0, k nonzeros per state; `pre` = pre-activations
               before TopK
  n, k, r      n_feat, active atoms per state, atom rank;  K, V = d_k, d_v
  L_dead       the AuxK loss (Gao et al. 2024) that revives dead atoms, weight λ_aux

Variants (Table 10):
  write   bilinear matched-filter encoder pre_i = Σ_r enc_k[i,r]ᵀ (S − b_dec) enc_v[i,r]
          + b_enc[i] (untied; `tied`: enc = dec factors) and the rank-r decoder.
          The canonical WriteSAE.
  matrix  dense encoder on vec(S − b_dec) (W_enc) and the rank-r decoder.
  flat    dense encoder and dense decoder (atoms = rows of W_dec, unit norm).

Equation tags: the paper numbers only Eqs. (1)–(4) (the logit shift and the GDN recurrence). The
SAE is stated unnumbered in §2, "minimise ‖x − Σ_{i∈TopK(a)} a_i vec(v_i w_iᵀ)‖² + λ_aux L_dead,
x = vec(S_t − M)", and in Table 10 (encoders); the functions below are tagged with those places.

Decisions where the paper is open (docs/DESIGN.md "3. The SAE"):
  - TopK keeps the k largest pre-activations (they may be negative) and applies ReLU to them.
  - BatchTopK (flag): in training, ReLU then one budget of k·B for the batch of each SAE. At
    inference (module in eval mode) an atom fires iff pre > θ, where θ [h] is an EMA (decay
    threshold_decay) of the smallest activation kept in each training batch; so eval codes do not
    depend on the rest of the batch.
  - AuxK: residual e = S − Ŝ.detach(); the top k_aux = min(256, #dead) pre-activations among dead
    atoms only, ReLU'd, decoded WITHOUT b_dec (as Gao et al.; the released code adds its bias) and
    fit to e by MSE.
  - All encoders start equal to the decoder (Gao et al. 2024: W_enc = W_decᵀ at init), every
    factor unit-norm.
  - Resampling draws its states with a generator seeded by (seed, head, step): runs are
    reproducible and resume exactly, and a head's SAE does not depend on the heads trained beside
    it.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("write", "matrix", "flat")


@dataclass
class SAEConfig:
    d_k: int                        # K: key side of the state
    d_v: int                        # V: value side
    variant: str = "write"          # write | matrix | flat (see the glossary)
    rank: int = 1                   # r: rank of a decoder atom (RWKV-7's increment is rank 2)
    n_feat: int = 2048              # n: dictionary size
    k: int = 32                     # active atoms per state (BatchTopK: on average over the batch)
    tied: bool = False              # write only: the encoder uses the decoder factors
    batch_topk: bool = False        # BatchTopK instead of TopK
    k_aux: int = 256                # AuxK: at most this many dead atoms fit the residual of a state
    lambda_aux: float = 1e-2        # paper value (the released code uses 1.0)
    dead_after: int = 100           # an atom silent for this many training steps is dead
    renorm_every: int = 100         # decoder factors back to unit norm every this many steps
                                    # (from step 0)
    resample_every: int = 250       # dead atoms resampled every this many steps (capped at
                                    # total/4, as the released code)
    n_sae: int = 1                  # h: independent SAEs trained together (heads of one layer)
    lr: float = 3e-4                # Adam peak learning rate (linear warmup, then cosine)
    lr_end: float = 3e-5            # cosine floor
    warmup: int = 50                # warmup steps (capped at total/4, as the code)
    threshold_decay: float = 0.99   # BatchTopK: EMA decay of the inference threshold θ
    resample_scale: float = 0.2     # a resampled encoder atom = direction × this × the mean
                                    # alive encoder norm


def check_config(cfg: SAEConfig):
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown SAE variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    if cfg.tied and cfg.variant != "write":
        raise ValueError(f"tied=True needs variant 'write' (the {cfg.variant} encoder is dense)")
    if not 1 <= cfg.k <= cfg.n_feat:
        raise ValueError(f"k={cfg.k} must lie in 1..n_feat={cfg.n_feat}")
    if not 1 <= cfg.rank <= min(cfg.d_k, cfg.d_v):
        raise ValueError(f"rank={cfg.rank} must lie in 1..min(d_k, d_v)={min(cfg.d_k, cfg.d_v)}")
    if min(cfg.d_k, cfg.d_v, cfg.n_sae, cfg.dead_after, cfg.renorm_every, cfg.resample_every) < 1:
        raise ValueError("d_k, d_v, n_sae, dead_after, renorm_every and resample_every "
                         "must be ≥ 1")


class ForwardOutput(NamedTuple):
    recon: torch.Tensor  # [h,B,K,V]  Ŝ
    codes: torch.Tensor  # [h,B,n]    a ≥ 0
    pre: torch.Tensor    # [h,B,n]    pre-activations
    mse: torch.Tensor    # [h]        mean over B and K·V
    aux: torch.Tensor    # [h]        AuxK (0 where no atom is dead, or no dead mask was given)
    loss: torch.Tensor   # []         Σ_h (mse + λ_aux·aux): a sum, so each head's gradient is
                         #            its own


class WriteSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, seed=None):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        h, n, r, K, V = cfg.n_sae, cfg.n_feat, cfg.rank, cfg.d_k, cfg.d_v
        gens = [torch.Generator().manual_seed(self.seed + j) for j in range(h)]  # head j: seed + j

        def unit_randn(*shape):  # [h,*shape], unit norm along the last axis
            x = torch.stack([torch.randn(shape, generator=g) for g in gens])
            return x / x.norm(dim=-1, keepdim=True)

        self.b_dec = nn.Parameter(torch.zeros(h, K, V))
        self.b_enc = nn.Parameter(torch.zeros(h, n))
        if cfg.variant == "flat":
            self.W_dec = nn.Parameter(unit_randn(n, K * V))                 # [h,n,K·V]
        else:
            self.dec_k = nn.Parameter(unit_randn(n, r, K))                  # [h,n,r,K]  v_i
            self.dec_v = nn.Parameter(unit_randn(n, r, V))                  # [h,n,r,V]  w_i
        if cfg.variant == "write" and not cfg.tied:
            self.enc_k = nn.Parameter(self.dec_k.detach().clone())          # [h,n,r,K]
            self.enc_v = nn.Parameter(self.dec_v.detach().clone())          # [h,n,r,V]
        elif cfg.variant != "write":
            self.W_enc = nn.Parameter(self.atoms().detach().clone())        # [h,n,K·V]
        if cfg.batch_topk:
            self.register_buffer("threshold", torch.full((h,), float("nan")))  # θ, set by training

    @torch.no_grad()
    def init_b_dec_(self, mean_state):
        """b_dec ← the mean training state [h,K,V] (the paper's M)."""
        self.b_dec.copy_(mean_state.reshape(self.b_dec.shape))

    def atom_params(self):
        """(name, parameter) of every parameter with one row per atom, laid out [h,n,...]."""
        return [(name, p) for name, p in self.named_parameters() if name != "b_dec"]

    # ---- atoms -----------------------------------------------------------------------------------

    def atoms(self):  # §2: A_i = Σ_r v_{i,r} w_{i,r}ᵀ, flattened  [h,n,K·V]
        if self.cfg.variant == "flat":
            return self.W_dec
        return rank_r_atoms(self.dec_k, self.dec_v)

    def encoder_atoms(self):  # the filter that pre_i takes an inner product with  [h,n,K·V]
        if self.cfg.variant != "write":
            return self.W_enc
        if self.cfg.tied:
            return rank_r_atoms(self.dec_k, self.dec_v)
        return rank_r_atoms(self.enc_k, self.enc_v)

    @torch.no_grad()
    def atom(self, i: int, head: int = 0):
        """Decoder atom i as factors (k [r,K], v [r,V]) with A_i = Σ_r k[r] ⊗ v[r]. Flat: its
        top-r SVD factors, the singular values put on the key side."""
        cfg = self.cfg
        if cfg.variant != "flat":
            return self.dec_k[head, i].clone(), self.dec_v[head, i].clone()
        U, s, Vh = torch.linalg.svd(self.W_dec[head, i].view(cfg.d_k, cfg.d_v))
        return (U[:, : cfg.rank] * s[: cfg.rank]).T.contiguous(), Vh[: cfg.rank].clone()

    # ---- encoder ---------------------------------------------------------------------------------

    def encode_pre(self, S):  # Table 10: pre_i = Σ_r enc_k[i,r]ᵀ (S − M) enc_v[i,r] + b_enc[i]
        """Pre-activations [h,B,n] of states S [h,B,K,V] as the paper writes the encoders
        (matrix, flat: ⟨vec(S − M), W_enc[i]⟩ + b_enc[i]). Training and eval call
        encode_pre_fast: same numbers and gradients (tests/test_writesae.py)."""
        x = self._states(S) - self.b_dec[:, None]                           # [h,B,K,V]  S − M
        if self.cfg.variant == "write":
            fk, fv = (self.dec_k, self.dec_v) if self.cfg.tied else (self.enc_k, self.enc_v)
            return torch.einsum("hnrk,hbkv,hnrv->hbn", fk, x, fv) + self.b_enc[:, None]
        return torch.einsum("hbx,hnx->hbn", x.flatten(2), self.W_enc) + self.b_enc[:, None]

    def encode_pre_fast(self, S):  # encode_pre as one GEMM against the materialised encoder atoms
        b = self.b_dec.flatten(1)[:, :, None]                               # [h,K·V,1]
        x = self._states(S).flatten(2) - b.detach().transpose(1, 2)     # [h,B,K·V]  vec(S − b_dec)
        # write: Σ_r enc_kᵀ x enc_v = ⟨x, Σ_r enc_k ⊗ enc_v⟩_F, so the encoder atoms are built once
        # per call and applied as one GEMM; the factored einsum makes a [B,n,V] intermediate
        # (docs/PERFORMANCE.md)
        E = self.encoder_atoms()                                        # [h,n,K·V]
        # b_dec's gradient through the centring is −Eᵀ Σ_B ∂pre: one mat-vec (Gao et al.'s
        # pre-bias trick) through the zero-valued term E (b − b.detach()), not a second [B,K·V]
        # GEMM through x (E's gradient from this term is b − b.detach() = 0, hence E.detach())
        offset = self.b_enc[:, :, None] - E.detach() @ (b - b.detach())     # [h,n,1]
        # E xᵀ rather than x Eᵀ: autograd's gradient of E then comes out contiguous, not a
        # transposed view that the atoms' backward bmm would copy matrix by matrix
        pre = torch.baddbmm(offset, E, x.transpose(1, 2))                   # [h,n,B]
        return pre.transpose(1, 2).contiguous()                             # [h,B,n]

    def encode(self, S):
        """Codes [h,B,n] (≥ 0): TopK, or BatchTopK (batch budget in training, threshold θ in
        eval mode)."""
        return self.sparsify(self.encode_pre_fast(S))[2]

    def sparsify(self, pre):
        """(idx [h,B,m], vals [h,B,m], codes [h,B,n]): the active atoms of every state, and the
        dense codes."""
        cfg = self.cfg
        if not cfg.batch_topk:
            idx, vals = topk(pre, cfg.k)
            return idx, vals, torch.zeros_like(pre).scatter(-1, idx, vals)
        if self.training:
            codes, kept = batch_topk(pre, cfg.k)
            self._update_threshold(kept.detach())
        else:
            if torch.isnan(self.threshold).any():
                raise RuntimeError("this BatchTopK SAE has no inference threshold yet: "
                                   "train it (train mode) first")
            codes = torch.where(pre > self.threshold[:, None, None], pre.relu(), 0.0)
        m = max(int((codes > 0).sum(-1).max()), 1)  # the busiest state sets the gather width
        vals, idx = codes.topk(m, dim=-1)
        return idx, vals, codes

    @torch.no_grad()
    def _update_threshold(self, kept):  # kept [h,k·B]
        # θ ← EMA of the smallest positive kept activation
        smallest = kept.masked_fill(kept <= 0, math.inf).amin(-1)           # [h]
        theta, d = self.threshold, self.cfg.threshold_decay
        new = torch.where(torch.isnan(theta), smallest, d * theta + (1 - d) * smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), new, theta))

    # ---- decoder ---------------------------------------------------------------------------------

    def decode(self, codes):  # §2: Ŝ = Σ_i a_i A_i + M, dense over all n atoms
        h, B, n = codes.shape
        return (codes @ self.atoms()).view(h, B, self.cfg.d_k, self.cfg.d_v) + self.b_dec[:, None]

    def decode_sparse(self, idx, vals, bias=True):
        """The same sum over the m active atoms only (gather + bmm): O(B·m·r·K·V) instead of
        O(B·n·K·V). bias=False leaves out b_dec (AuxK)."""
        cfg = self.cfg
        h, B, m = idx.shape
        K, V, n, r = cfg.d_k, cfg.d_v, cfg.n_feat, cfg.rank
        # [h,B,m] rows of the [h·n] table
        rows = idx + n * torch.arange(h, device=idx.device)[:, None, None]
        if cfg.variant == "flat":  # Σ_j a_j W_dec[i_j] without a [B,m,K·V] intermediate
            out = F.embedding_bag(rows.reshape(h * B, m), self.W_dec.flatten(0, 1),
                                  per_sample_weights=vals.reshape(h * B, m),
                                  mode="sum")                               # [h·B,K·V]
        else:  # Σ_j Σ_r a_j v_{j,r} w_{j,r}ᵀ = (a·V_idx)ᵀ W_idx
            # index_select, not [rows]: its backward (index_add_) sums repeated rows in a fixed
            # order on any number of CPU threads; the indexing backward does not
            flat = rows.flatten()
            dk = self.dec_k.flatten(0, 1)                                   # [h·n,r,K]
            dv = self.dec_v.flatten(0, 1)                                   # [h·n,r,V]
            ks = dk.index_select(0, flat) * vals.reshape(-1, 1, 1)          # [h·B·m,r,K]
            vs = dv.index_select(0, flat)                                   # [h·B·m,r,V]
            out = ks.view(h * B, m * r, K).transpose(1, 2) @ vs.view(h * B, m * r, V)  # [h·B,K,V]
        out = out.view(h, B, K, V)
        return out + self.b_dec[:, None] if bias else out

    # ---- forward and loss ------------------------------------------------------------------------

    def forward(self, S, dead=None):
        """§2 objective. dead [h,n] (bool, from DeadTracker) switches on AuxK."""
        S = self._states(S)
        pre = self.encode_pre_fast(S)                                       # [h,B,n]
        idx, vals, codes = self.sparsify(pre)
        recon = self.decode_sparse(idx, vals)                               # [h,B,K,V]
        mse = (recon - S).pow(2).mean((1, 2, 3))                            # [h]
        if dead is None:
            aux = torch.zeros_like(mse)
        else:
            aux = self.aux_k_loss(pre, S - recon.detach(), dead)
        loss = (mse + self.cfg.lambda_aux * aux).sum()
        return ForwardOutput(recon, codes, pre, mse, aux, loss)

    def aux_k_loss(self, pre, residual, dead):  # §2 L_dead (AuxK of Gao et al. 2024)  -> [h]
        n_dead = dead.sum(-1)                                               # [h]
        k_aux = min(self.cfg.k_aux, int(n_dead.max()))
        if k_aux == 0:
            return pre.new_zeros(pre.shape[0])
        # alive atoms at −inf: a head with fewer than k_aux dead atoms gets ReLU(−inf) = 0 on the
        # rest
        vals, idx = pre.masked_fill(~dead[:, None], -math.inf).topk(k_aux, dim=-1)  # [h,B,k_aux]
        err = (self.decode_sparse(idx, vals.relu(), bias=False) - residual).pow(2).mean((1, 2, 3))
        return err * (n_dead > 0)

    @torch.no_grad()
    def normalize_factors_(self):
        """Every decoder factor (flat: every atom row) back to unit L2 norm (Table 10's norm
        constraint)."""
        for p in [self.W_dec] if self.cfg.variant == "flat" else [self.dec_k, self.dec_v]:
            p.div_(p.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def _states(self, S):
        h, K, V = self.cfg.n_sae, self.cfg.d_k, self.cfg.d_v
        if S.dim() != 4 or S.shape[0] != h or tuple(S.shape[2:]) != (K, V):
            raise ValueError(f"states must be [h={h},B,K={K},V={V}], got {list(S.shape)}")
        return S.float()

    # ---- save / load -----------------------------------------------------------------------------

    def save(self, path):
        """A directory with cfg.json and sae.safetensors (each written to a temp file, then
        renamed)."""
        from safetensors.torch import save_file
        from models.hub import atomic_write
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = json.dumps(asdict(self.cfg), indent=1) + "\n"
        atomic_write(path / "cfg.json", lambda tmp: tmp.write_text(cfg))
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        atomic_write(path / "sae.safetensors",
                     lambda tmp: save_file(tensors, str(tmp), metadata={"seed": str(self.seed)}))

    @classmethod
    def load(cls, name_or_path, device="cpu", revision=None):
        """A directory written by save(), or a Hub repo id holding those two files."""
        from models.hub import CheckpointError, check_tensors, load_safetensors, read_json, resolve
        path = resolve(name_or_path, revision=revision,
                       allow_patterns=["cfg.json", "sae.safetensors"])
        for f in ("cfg.json", "sae.safetensors"):
            if not (path / f).is_file():
                raise CheckpointError(f"{path} has no {f}: not a WriteSAE directory")
        raw = read_json(path / "cfg.json")
        names = {f.name for f in fields(SAEConfig)}
        unknown = sorted(set(raw) - names)
        missing = sorted({"d_k", "d_v"} - set(raw))
        if unknown:
            raise CheckpointError(f"{path / 'cfg.json'}: unknown SAEConfig field {unknown[0]!r}")
        if missing:
            raise CheckpointError(f"{path / 'cfg.json'}: missing SAEConfig field {missing[0]!r}")
        tensors, meta = load_safetensors(path / "sae.safetensors", metadata=True)
        sae = cls(SAEConfig(**raw), seed=int(meta.get("seed", 0)))
        expected = {name: t.shape for name, t in sae.state_dict().items()}
        check_tensors(tensors, expected, where=f"{path / 'sae.safetensors'} vs its cfg.json")
        sae.load_state_dict(tensors, strict=True)
        return sae.to(device)


def rank_r_atoms(fk, fv):  # [h,n,r,K], [h,n,r,V] -> Σ_r fk[r] ⊗ fv[r] = fkᵀ fv, flat [h,n,K·V]
    # a batched matmul: its backward is two more, where einsum's broadcast-multiply-sum makes
    # [h,n,r,K,V] passes
    return (fk.transpose(-1, -2) @ fv).flatten(2)


def topk(pre, k):  # §2 TopK(a): ReLU of the k largest pre-activations  -> idx, vals [h,B,k]
    vals, idx = pre.topk(k, dim=-1)
    return idx, vals.relu()


def batch_topk(pre, k):  # Bussmann et al. 2024: ReLU, then the top k·B of each SAE's batch
    # -> codes [h,B,n], kept [h,k·B]
    h, B, n = pre.shape
    kept, flat_idx = pre.relu().flatten(1).topk(k * B, dim=-1)              # [h,k·B]
    codes = torch.zeros_like(pre).flatten(1).scatter(1, flat_idx, kept)     # [h,B·n]
    return codes.view(h, B, n), kept


def fve(S, recon):
    """Fraction of variance explained per SAE [h]: 1 − Σ‖S − Ŝ‖² / Σ‖S − mean_B S‖² over the
    batch."""
    sse = (S - recon).pow(2).sum((1, 2, 3))
    sst = (S - S.mean(1, keepdim=True)).pow(2).sum((1, 2, 3))
    return 1 - sse / sst.clamp_min(1e-30)


# ================================================================================================
# Training helpers (train.py owns the loop, the data and the checkpoints)
# ================================================================================================

def lr_at(step, total, lr=3e-4, lr_end=3e-5, warmup=50):
    """Linear warmup from 0 over min(warmup, total/4) steps, then cosine to lr_end at `total`
    (the released code's get_lr; step 0 has lr 0)."""
    w = min(warmup, total // 4)
    if step < w:
        return lr * step / w
    t = min((step - w) / max(total - w, 1), 1.0)
    return lr_end + (lr - lr_end) * 0.5 * (1 + math.cos(math.pi * t))


class DeadTracker:
    """Training steps since each atom last fired anywhere in a batch, [h,n]; dead = silent ≥
    dead_after."""

    def __init__(self, cfg: SAEConfig, device=None):
        self.dead_after = cfg.dead_after
        self.steps = torch.zeros(cfg.n_sae, cfg.n_feat, dtype=torch.long, device=device)

    def update(self, codes):  # codes [h,B,n]
        self.steps = torch.where((codes > 0).any(1), 0, self.steps + 1)

    @property
    def dead(self):  # [h,n] bool
        return self.steps >= self.dead_after

    def state_dict(self):
        return {"steps": self.steps.clone()}

    def load_state_dict(self, state):
        self.steps = state["steps"].to(self.steps.device, torch.long).clone()


def train_step(sae, opt, S, step, tracker, total_steps):
    """One Adam step on a batch S [h,B,K,V]; then dead tracking, re-normalisation every
    renorm_every steps (from step 0, after the update, as the released code) and resampling every
    min(resample_every, total/4) steps."""
    cfg = sae.cfg
    lr = lr_at(step, total_steps, cfg.lr, cfg.lr_end, cfg.warmup)
    for group in opt.param_groups:
        group["lr"] = lr
    sae.train()
    out = sae(S, dead=tracker.dead)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    tracker.update(out.codes)
    if step % cfg.renorm_every == 0:
        sae.normalize_factors_()
    if step > 0 and step % min(cfg.resample_every, max(total_steps // 4, 1)) == 0:
        resample_dead_(sae, opt, S, out.recon.detach(), tracker, step)
    return {"loss": out.loss.item(), "mse": out.mse.mean().item(), "aux": out.aux.mean().item(),
            "fve": fve(S.float(), out.recon.detach()).mean().item(),
            "l0": (out.codes > 0).sum(-1).float().mean().item(),
            "dead": int(tracker.dead.sum()), "lr": lr}


@torch.no_grad()
def resample_dead_(sae, opt, S, recon, tracker, step):
    """Revive dead atoms from the batch's worst-reconstructed states (drawn ∝ squared error):
    decoder factors = the top-r singular vectors of the centred state; encoder = the same directions
    × resample_scale × the mean alive encoder norm (on the key side only, so the encoder atom is
    scaled once; tied: the decoder itself); b_enc = 0; their Adam moments zeroed; their silence
    counters reset."""
    cfg = sae.cfg
    S = S.float()
    err = (S - recon).pow(2).flatten(2).sum(-1)                             # [h,B]
    for j in range(cfg.n_sae):
        dead = tracker.dead[j].nonzero().squeeze(-1)                        # [m]
        if dead.numel() == 0:
            continue
        alive = ~tracker.dead[j]
        gen = torch.Generator().manual_seed((sae.seed * 1_000_003 + j) * 1_000_003 + step)
        p = err[j].double().cpu()
        weights = p if p.sum() > 0 else torch.ones_like(p)
        pick = torch.multinomial(weights, dead.numel(), replacement=True, generator=gen)
        centred = S[j, pick.to(S.device)] - sae.b_dec[j]                    # [m,K,V]

        def mean_norm(W):  # mean norm of the alive rows of W[j] (1 when none is alive)
            return W[j][alive].norm(dim=-1).mean().nan_to_num(1.0)

        if cfg.variant == "flat":
            d = F.normalize(centred.flatten(1), dim=-1)                     # [m,K·V]
            sae.W_enc[j, dead] = d * cfg.resample_scale * mean_norm(sae.W_enc)
            sae.W_dec[j, dead] = d
        else:
            U, _, Vh = torch.linalg.svd(centred)                  # best rank-r fit of each state
            k_dir = U[..., : cfg.rank].transpose(1, 2)                      # [m,r,K]
            v_dir = Vh[:, : cfg.rank]                                       # [m,r,V]
            if cfg.variant == "matrix":
                d = F.normalize(centred.flatten(1), dim=-1)                 # [m,K·V]
                sae.W_enc[j, dead] = d * cfg.resample_scale * mean_norm(sae.W_enc)
            elif not cfg.tied:
                sae.enc_k[j, dead] = k_dir * cfg.resample_scale * mean_norm(sae.enc_k)
                sae.enc_v[j, dead] = v_dir * mean_norm(sae.enc_v)
            sae.dec_k[j, dead] = k_dir
            sae.dec_v[j, dead] = v_dir
        sae.b_enc[j, dead] = 0.0
        for _, p in sae.atom_params():
            for moment in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if moment in opt.state.get(p, {}):
                    opt.state[p][moment][j, dead] = 0.0
        tracker.steps[j, dead] = 0


# ==== Experiments: edits and the closed-form logit shift ====
# eval.py's protocols use these: the substitutes of the three conditions, the transport of a
# perturbation's key factor, Eq. (1), and the install direction v*_T (App. I.5–I.6).

def frob(k, v):
    """‖Σ_r k_r v_rᵀ‖_F from the factors k [..,r,K], v [..,r,V] without forming the matrix."""
    return ((k @ k.transpose(-1, -2)) * (v @ v.transpose(-1, -2))).sum((-1, -2)).clamp_min(0).sqrt()


def frob_cos(k1, v1, k2, v2):
    """Signed Frobenius cosine ⟨A, W⟩_F / ‖A‖‖W‖ between two factored matrices (broadcast over
    leading dims)."""
    inner = ((k1 @ k2.transpose(-1, -2)) * (v1 @ v2.transpose(-1, -2))).sum((-1, -2))
    return inner / (frob(k1, v1) * frob(k2, v2)).clamp_min(1e-30)


def substitution_factors(dec_k, dec_v, code, nat_k, nat_v, gen):
    """The substitutes X of the three conditions at one firing (docs/DESIGN.md "5. The
    substitution test"), as factors (k [r,K], v [r,V]).

    dec_k [n,r,K], dec_v [n,r,V] the decoder atoms; code [n] the TopK code a(t); nat_k, nat_v the
    native write. delete is None (X = 0). The Gaussian factors are drawn per firing from gen
    (CPU)."""
    i = int(code.argmax())
    dk, dv = dec_k[i], dec_v[i]
    atom = (code[i] * dk, dv)                                                 # a_{i*} A_{i*}
    rk = torch.randn(dk.shape, generator=gen).to(dk)
    rv = torch.randn(dv.shape, generator=gen).to(dv)
    n_atom = frob(*atom)
    n_nat = frob(nat_k, nat_v)
    n_rand = frob(rk, rv)
    n_unit = frob(dk, dv)
    return {"atom": atom, "delete": None, "random": (rk * n_atom / n_rand, rv),
            "atom_matched": (dk * n_nat / n_unit, dv), "random_matched": (rk * n_nat / n_rand, rv)}


def logit_shift_prediction(eps, key, q, gain, dec_v, W_O, W_U_tok):
    """Eq. (1) in our orientation: Δℓ_tok ≈ ε Σ_r ⟨key_r, q̃_t⟩ ⟨W_O[h](g_t ⊙ dec_v_r), W_U[tok]⟩.

    key [..,r,K] the key factor carried to t (G·dec_k, or the exact transport); q [..,K];
    gain [..,V]; dec_v [..,r,V]; W_O [D,V]; W_U_tok [..,n_tok,D] (rows already scaled by the final
    norm's local gain)."""
    read = (key * q[..., None, :]).sum(-1)                                    # [..,r]
    resid = (gain[..., None, :] * dec_v) @ W_O.T                              # [..,r,D]
    return eps * torch.einsum("...r,...rd,...nd->...n", read, resid, W_U_tok)  # [..,n_tok]


def install_direction(W_O, W_U_T):
    """v*_T = W_O[h]ᵀ W_U[T] / ‖·‖: the unit value-side direction whose write most raises token
    T's logit."""
    v = W_U_T @ W_O                                                           # [..,V]
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def shift_predictions(model, dk, dv, w, t0, hs, unembed, read, W_O, eps):
    """Eq. (1) per unit ε at t0 + h (h in hs) for dk ⊗ dv [A,r,K], [A,r,V] added to S_{t0}, two
    ways. 'nofit' carries the key by G = Π decay (no erase term) through the head norm's diagonal
    gain; 'exact' by model.transport_key (the exact in-layer transport δS_s = M_s δS_{s−1}: the
    inputs at s do not depend on this layer's state, so M_s acts on the key side only) and the head
    norm's exact local Jacobian, model.norm_jacobian (NaN where the writes lack what the transport
    needs).
    w the writes [T,..]; unembed(s) -> W_U rows through the final norm at s [A,n_tok,D];
    read [T,V] the unedited reads.  -> nofit, exact [A,Hn,n_tok]"""
    key_g = dk.clone()
    key_x = dk.clone()
    nofit, exact = [], []
    for s in range(t0, t0 + max(hs) + 1):
        if s > t0:
            w_s = {n: x[s] for n, x in w.items()}
            key_g = w_s["decay"][None, None] * key_g
            key_x = None if key_x is None else model.transport_key(key_x, w_s)
        if s - t0 not in hs:
            continue
        U = unembed(s)
        q, gain = w["query"][s], w["gain"][s]
        nofit.append(logit_shift_prediction(1.0, key_g, q, gain, dv, W_O, U))
        if key_x is None:
            exact.append(torch.full_like(nofit[-1], float("nan")))
        else:
            jac_dv = model.norm_jacobian(read[s], dv, eps)
            exact.append(logit_shift_prediction(1.0, key_x, q, gain, jac_dv, W_O, U))
    return torch.stack(nofit, 1), torch.stack(exact, 1)


def install_factors(w, s, v, m=1.0):
    """m·‖k_s v_sᵀ‖·k̂_s ⊗ v (App. I.6): the native key direction at s, sized like its write
    without β.
    w the writes [T,..]; v [n,V] unit value directions.  -> ([1,K], [n,V])"""
    k = w["add_k"][s, :1]                                                     # [1,K]
    size = frob(k, w["add_v"][s, :1]) / (w["beta"][s] if "beta" in w else 1.0)
    return m * size * (k / k.norm().clamp_min(1e-30)), v


def atom_write_cosines(dec_k, dec_v, codes, nat_k, nat_v, chunk=8192):
    """Signed Frobenius cosine of each firing atom with the native write at its position.
    codes [T,n]; nat_k [T,r',K], nat_v [T,r',V].  -> cos, atom id [firings]"""
    pos, atom = (codes > 0).nonzero(as_tuple=True)
    cos = [frob_cos(dec_k[a], dec_v[a], nat_k[p], nat_v[p])
           for p, a in zip(pos.split(chunk), atom.split(chunk))]
    return (torch.cat(cos) if cos else codes.new_zeros(0)), atom
