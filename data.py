"""The data side of training: corpus -> token blocks -> a factor store on disk -> states S_t
rebuilt in batches.

Glossary
  block         seq_len consecutive tokens of the concatenated corpus (documents joined with no
                separator, as the paper's extraction does); blocks [N,T] int, T = seq_len. Each
                block starts from the zero state.
  split         whole blocks, drawn at random with the seed: `train` and `val` block indices (val
                for the SAE's validation and for eval.py, never overlapping training blocks), saved
                as blocks.json + blocks.safetensors in the run directory
  h, r, K, V    heads stored together, write rank, state dims;  Kd = 1 (GDN, Mamba-2) or K (RWKV-7)
  factor store  per block, token and head only what rebuilds the state (models/common.py):
                  S_t = exp(log_decay_t) ⊙ S_{t−1} + Σ_r inc_k[t,r] inc_v[t,r]ᵀ ,   S_{−1} = 0
                inc_k [N,T,h,r,K], inc_v [N,T,h,r,V], log_decay [N,T,h,Kd]: O(r(K+V) + Kd)
                numbers a token instead of K·V, as raw memory-mapped files (torch.from_file) in the
                store dtype, plus store.json
  store dtype   float16 (default), bfloat16 or float32. Two choices keep 16 bits faithful:
                - the log of the decay is stored, not the decay: α = 0.9999 rounds to 1.0 in fp16
                  (and α = 0.999 in bf16), which would turn a leaky memory into a perfect one;
                  log α keeps its relative precision;
                - each rank-1 pair is balanced, k·c and v/c with ‖k c‖ = ‖v / c‖ (the product
                  unchanged), which keeps both factors near the middle of fp16's range
                  (6e-5 .. 65504); a value still beyond 65504 is an error that suggests bfloat16
                  (same range as fp32, 8× coarser mantissa than fp16).
  positions m   the states a sequence contributes per epoch: "all" (m = T) or m random positions,
                redrawn every epoch; validation uses one fixed draw
"""

import hashlib
import json
from pathlib import Path

import torch

from models.common import Capture, walk_states
from models.hub import atomic_write

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FACTORS = ("inc_k", "inc_v", "log_decay")


# ------------------------------------------------------------------------------------------------
# 1. Corpus -> blocks -> split

def read_texts(paths, chunk=1 << 20):
    """Documents from text files, .jsonl files (a "text" field per line), or "demo", read lazily:
    a caller that stops early (make_blocks, once it has its tokens) reads no further. A text file
    comes in pieces of about `chunk` characters, cut after a line break where the piece has one
    (documents are concatenated anyway)."""
    for p in paths:
        if p == "demo":
            yield from demo_corpus()
            continue
        try:
            with open(p, encoding="utf-8") as f:
                yield from (json_lines(f, p) if p.endswith(".jsonl") else text_pieces(f, chunk))
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise ValueError(f"cannot read corpus file {p}: {reason}") from None


def demo_corpus() -> list[str]:
    try:
        from demo.build import demo_texts
    except ImportError:
        raise ValueError("the demo corpus needs demo/build.py, which is not in this checkout; "
                         "pass your own text with --data FILE") from None
    try:
        return demo_texts()
    except RuntimeError as e:  # demo.build.CorpusUnavailable: names each registry's failure
        raise ValueError(str(e)) from None


def text_pieces(f, chunk):
    carry = ""
    while piece := f.read(chunk):
        piece = carry + piece
        cut = piece.rfind("\n") + 1 or len(piece)  # whole lines where the piece has a line break
        carry = piece[cut:]
        yield piece[:cut]
    if carry:
        yield carry


def json_lines(f, p):
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{p} line {i}: not a JSON object with a \"text\" field") from None


def make_blocks(texts, tok, seq_len: int, n_seqs: int | None = None, names=()) -> torch.Tensor:
    """Tokenise the documents in order until n_seqs blocks are had (texts may be a lazy iterator: no
    more of it is read), concatenate, cut into at most n_seqs blocks  -> [N,T] int32."""
    ids = []
    for t in texts:
        ids += tok.encode(t)
        if n_seqs is not None and len(ids) >= n_seqs * seq_len:
            break
    where = ", ".join(map(str, names)) or "the corpus"
    if not ids:
        raise ValueError(f"the corpus is empty: no tokens in {where}")
    n = len(ids) // seq_len if n_seqs is None else min(len(ids) // seq_len, n_seqs)
    if n < 2:
        raise ValueError(f"{where} gives {len(ids)} tokens: too few for two --seq-len {seq_len} "
                         f"blocks (one to train on, one to validate on)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def split_blocks(n: int, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) block indices: a seeded permutation, the first round(val_frac·n) (at least 1)
    to val."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(val_frac * n)), n - 1)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def save_blocks(run: Path, blocks, train, val):
    from safetensors.torch import save_file
    save_file({"blocks": blocks.contiguous()}, str(run / "blocks.safetensors"))
    meta = {"tokens": "blocks.safetensors", "seq_len": blocks.shape[1],
            "n_blocks": blocks.shape[0], "train": train, "val": val}
    (run / "blocks.json").write_text(json.dumps(meta) + "\n")


def load_blocks(run) -> tuple[torch.Tensor, list[int], list[int]]:
    """(blocks [N,T] int32, train, val) of a run directory: what eval.py reads to stay off the
    training blocks."""
    from models.hub import CheckpointError, load_safetensors, read_json
    run = Path(run)
    meta = read_json(run / "blocks.json")
    if not {"tokens", "train", "val"} <= meta.keys():
        raise CheckpointError(f"{run / 'blocks.json'} lacks tokens / train / val: not train.py's")
    blocks = load_safetensors(run / meta["tokens"]).get("blocks")
    if blocks is None:
        raise CheckpointError(f"{run / meta['tokens']} holds no 'blocks' tensor")
    return blocks, meta["train"], meta["val"]


def fingerprint(blocks) -> str:
    """A short hash of the token blocks: a store is reused only for the same tokens."""
    from safetensors.torch import save
    return hashlib.sha256(save({"blocks": blocks.contiguous()})).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# 2. The factor store

class FactorStore:
    """inc_k [N,T,h,r,K], inc_v [N,T,h,r,V], log_decay [N,T,h,Kd] as memory-mapped files in
    `root`."""

    def __init__(self, root: Path, meta: dict, writable: bool = False):
        self.root = Path(root)
        self.meta = meta
        N, T, h, r, K, V, Kd = (meta[k] for k in ("n", "seq_len", "h", "r", "K", "V", "Kd"))
        self.shapes = {"inc_k": (N, T, h, r, K), "inc_v": (N, T, h, r, V),
                       "log_decay": (N, T, h, Kd)}
        self.dtype = STORE_DTYPES[meta["dtype"]]
        # shared=True creates the file; shared=False maps it copy-on-write
        for name, shape in self.shapes.items():
            numel = torch.Size(shape).numel()
            t = torch.from_file(str(self.root / f"{name}.bin"), shared=writable, size=numel,
                                dtype=self.dtype)
            setattr(self, name, t.view(shape))

    @classmethod
    def create(cls, root, n, seq_len, h, r, K, V, Kd, dtype="float16", **info) -> "FactorStore":
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        (root / "store.json").unlink(missing_ok=True)  # present only once the store is complete
        meta = dict(n=n, seq_len=seq_len, h=h, r=r, K=K, V=V, Kd=Kd, dtype=dtype, **info)
        return cls(root, meta, writable=True)

    @classmethod
    def open(cls, root) -> "FactorStore | None":
        """The complete store in root, or None when there is none (or an extraction was cut
        short)."""
        from models.hub import read_json
        f = Path(root) / "store.json"
        return cls(root, read_json(f)) if f.exists() else None

    def finish(self):
        text = json.dumps(self.meta, indent=1) + "\n"
        atomic_write(self.root / "store.json", lambda tmp: tmp.write_text(text))

    def bytes_per_token_head(self) -> int:
        m = self.meta
        return (m["r"] * (m["K"] + m["V"]) + m["Kd"]) * self.dtype.itemsize

    def put(self, rows, inc_k, inc_v, decay):
        """Store blocks `rows` from fp32 writes inc_k [B,T,h,r,K], inc_v [B,T,h,r,V],
        decay [B,T,h,Kd]."""
        nk = inc_k.norm(dim=-1, keepdim=True)
        nv = inc_v.norm(dim=-1, keepdim=True)
        c = torch.where((nk > 0) & (nv > 0), (nv / nk.clamp_min(1e-30)).sqrt(), torch.ones_like(nk))
        inc_k = inc_k * c                       # k vᵀ unchanged (the balance of the glossary)
        inc_v = inc_v / c
        log_decay = decay.log()
        big = max(inc_k.abs().max().item(), inc_v.abs().max().item())
        if big > torch.finfo(self.dtype).max:
            raise ValueError(f"write factors reach {big:.3g}, beyond {self.meta['dtype']}'s range: "
                             f"use --store-dtype bfloat16 or float32")
        rows = torch.as_tensor(rows)
        for name, x in zip(FACTORS, (inc_k, inc_v, log_decay)):
            getattr(self, name)[rows] = x.to(self.dtype).cpu()


@torch.no_grad()
def extract(model, blocks, layer, heads, root, dtype="float16", batch=8, rank=0, world=1,
            barrier=None, progress=False, **info) -> FactorStore:
    """Run the model over every block (this rank: blocks rank, rank+world, ...) up to `layer`, and
    store the increment factors and decay of `heads`. All ranks write disjoint rows of the same
    files; rank 0 creates them and, once every rank is done, marks the store complete."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    cap = Capture(layers=(layer,), heads=tuple(heads), stop_after=True)

    def writes(ids):
        w = model(ids.to(device=device, dtype=torch.long), capture=cap).captures[layer]
        return w["inc_k"].float(), w["inc_v"].float(), w["decay"].float()

    ik, iv, d = writes(blocks[:1, :2])  # a two-token probe tells the factor shapes
    meta = dict(n=blocks.shape[0], seq_len=blocks.shape[1], h=len(heads), r=ik.shape[3],
                K=ik.shape[4], V=iv.shape[4], Kd=d.shape[3], dtype=dtype, layer=layer,
                heads=list(heads), **info)
    if rank == 0:
        FactorStore.create(root, **meta)
    if barrier:
        barrier()
    store = FactorStore(root, meta, writable=True)
    mine = torch.arange(rank, blocks.shape[0], world)
    starts = range(0, len(mine), batch)
    for i in tqdm(starts, desc=f"extract L{layer}", unit="batch", disable=not progress):
        rows = mine[i:i + batch]
        store.put(rows, *writes(blocks[rows]))
    if barrier:
        barrier()
    if rank == 0:
        store.finish()
    return FactorStore(root, meta)


# ------------------------------------------------------------------------------------------------
# 3. States from the store: the recurrence, then batches of states at sampled positions

def recurrence(inc_k, inc_v, log_decay, T=None):
    """Yields (t, S_t [B,h,K,V]) for t < T, fp32 whatever the store dtype: the models' own state
    rebuild (models.common.walk_states) from the stored log-decay. S_t is updated in place: copy
    what you keep.

    inc_k [B,T,h,r,K], inc_v [B,T,h,r,V], log_decay [B,T,h,Kd], all on the device the states
    should be on."""
    return walk_states(inc_k, inc_v, log_decay.float().exp(), T=T)


def states_at(inc_k, inc_v, log_decay, pos):
    """The states of B sequences at m positions each: pos [B,m] long (CPU)  ->  [B,m,h,K,V]
    fp32."""
    B, m = pos.shape
    h, K, V = inc_k.shape[2], inc_k.shape[-1], inc_v.shape[-1]
    out = inc_k.new_empty(B * m, h, K, V, dtype=torch.float32)
    flat = pos.flatten()  # slot b·m + j holds S_{pos[b,j]} of sequence b
    order = flat.argsort(stable=True)                                 # slots sorted by time
    counts = torch.bincount(flat, minlength=inc_k.shape[1]).tolist()  # slots filled at each t
    slot = order.to(inc_k.device)
    seq = (order // m).to(inc_k.device)
    start = 0
    for t, S in recurrence(inc_k, inc_v, log_decay, T=int(flat.max()) + 1):
        if counts[t]:
            sl = slice(start, start + counts[t])
            # whole [h,K,V] rows: plain copies
            out.index_copy_(0, slot[sl], S.index_select(0, seq[sl]))
            start += counts[t]
    return out.view(B, m, *out.shape[1:])


class StateLoader:
    """Batches of states [h,b,K,V] (fp32, on `device`) rebuilt from a store, for the blocks `seqs`.

    An epoch visits every sequence once, with m positions drawn afresh (all positions if m = T);
    this rank takes the sequences rank, rank+world, ... of the epoch's permutation and a local batch
    b (the local batches of all ranks add up to `batch`). Sequences are rebuilt `group` at a time
    and their states shuffled together, so a batch mixes states of up to `group` sequences. The plan
    is fixed by (seed, epoch): epoch(e, start=j) resumes exactly."""

    def __init__(self, store, seqs, positions, batch, device, seed, rank=0, world=1, group=32):
        self.store = store
        self.seqs = list(seqs)
        self.device = device
        self.seed = seed
        self.rank = rank
        self.world = world
        T = store.meta["seq_len"]
        self.m = T if positions == "all" else min(int(positions), T)
        N = len(self.seqs)
        counts = [len(range(r, N, world)) for r in range(world)]
        sizes = [batch // world + (r < batch % world) for r in range(world)]
        self.batch = sizes[rank]
        # steps per epoch, equal on all ranks
        self.steps = min(c * self.m // max(b, 1) for c, b in zip(counts, sizes))
        # one loop rebuilds `group` sequences: more amortise the per-step launches (the GPU cost),
        # but keep the group's states within 16 batches of memory (positions all, m = T, lowers it)
        self.group = max(1, min(group, 16 * self.batch // self.m))

    def plan(self, epoch):
        """(sequence ids [n_local] into self.seqs, positions [n_local,m], sample order
        [n_local·m])."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        T, N = self.store.meta["seq_len"], len(self.seqs)
        order = torch.randperm(N, generator=g)
        if self.m == T:
            pos = torch.arange(T).expand(N, T)
        else:  # drawn for every sequence whatever the world size: a sequence's positions do not
            # depend on it
            pos = torch.rand(N, T, generator=g).argsort(-1)[:, : self.m].sort(-1).values  # [N,m]
        mine = order[self.rank::self.world]
        local_seed = (self.seed * 1_000_003 + epoch) * 1_000_003 + self.rank
        local = torch.Generator().manual_seed(local_seed)
        shuffle = torch.cat([torch.randperm(len(mine[i:i + self.group]) * self.m, generator=local)
                             + i * self.m for i in range(0, len(mine), self.group)])
        return mine, pos[mine], shuffle

    def rebuild(self, seq_ids, pos):
        rows = torch.tensor([self.seqs[i] for i in seq_ids])
        factors = [getattr(self.store, n)[rows].to(self.device) for n in FACTORS]
        S = states_at(*factors, pos)                                      # [G,m,h,K,V]
        return S.flatten(0, 1)                                            # [G·m,h,K,V]

    def epoch(self, e, start=0):
        """Yields the local batches j = start .. steps−1 of epoch e, each [h,b,K,V]."""
        mine, pos, shuffle = self.plan(e)
        per_group = self.group * self.m
        cached = (None, None)
        for j in range(start, self.steps):
            idx = shuffle[j * self.batch:(j + 1) * self.batch]
            parts = []
            for gi in sorted(set((idx // per_group).tolist())):
                if cached[0] != gi:
                    sl = slice(gi * self.group, (gi + 1) * self.group)
                    cached = (gi, self.rebuild(mine[sl].tolist(), pos[sl]))
                sel = idx[(idx // per_group) == gi] - gi * per_group
                parts.append(cached[1][sel.to(self.device)])
            yield torch.cat(parts).transpose(0, 1)                        # [h,b,K,V]

    def batches(self, step=0):
        """Every batch from global step `step` on, epoch after epoch (the loop stops it)."""
        e, j = divmod(step, self.steps)
        while True:
            yield from self.epoch(e, j)
            e += 1
            j = 0

    def mean_state(self):
        """Σ_t S_t and the count over every position of this rank's sequences (all ranks' sums
        add up)."""
        total, count = None, 0
        mine = list(range(self.rank, len(self.seqs), self.world))
        for i in range(0, len(mine), self.group):
            rows = torch.tensor([self.seqs[j] for j in mine[i:i + self.group]])
            factors = [getattr(self.store, n)[rows].to(self.device) for n in FACTORS]
            acc = 0
            for _, S in recurrence(*factors):
                acc = acc + S.sum(0)                                      # [h,K,V]
            total = acc.double() if total is None else total + acc.double()
            count += len(rows) * self.store.meta["seq_len"]
        return total, count
