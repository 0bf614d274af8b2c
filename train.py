"""Train a WriteSAE on the recurrent state S_t of one (layer, head), or of several heads of one
layer at once.

  python train.py                                       # a demo model (see demo/) at its own site
  python train.py --model Qwen/Qwen3.5-0.8B --layer 9 --head 4 --data owt.jsonl --device cuda
  torchrun --standalone --nproc_per_node 4 train.py --head all ...   # ranks share the work

Pipeline (data.py): corpus -> token blocks, 80/20 split of whole blocks -> the model runs up to
--layer; the factor store keeps per token and head only the increment factors and log-decay
(O(K+V) numbers, memory-mapped) -> batches of S_t rebuilt from them in fp32 on the training
device -> writesae.train_step, the heads as one batch of SAEs.
torchrun: each rank extracts every world-th block into the same files and trains on its share of
each batch; gradients are averaged weighted by local batch sizes (a split of one batch gives that
batch's gradient), an atom fired if it fired on any rank, and where a rank decides from its own
batch (resampling, BatchTopK's threshold) rank 0's SAE is broadcast. Rank 0 writes.

Run directory (--out, default runs/<model>-L<layer>-H<heads>):
  config.json      arguments, git commit, site (arch, layer, heads, K, V, --write), SAE config,
                   data sizes
  blocks.json      + blocks.safetensors: the token blocks and the train / val block indices
                   (eval.py uses val)
  store/           the factor store (reused when model weights, layer, heads, tokens and store
                   dtype match)
  metrics.jsonl    {"step", "train": {...}} and {"step", "val": {...}} records; val FVE is the
                   number to watch
  best/, last/     WriteSAE directories (cfg.json + sae.safetensors; last/ adds train_state.pt),
                   each written beside and renamed into place, so a crash leaves the previous one
  replaced/        --overwrite: the previous run (all but its store) until the new run's first
                   checkpoint, which deletes it; a new run stopped before that gets it back
A run directory is continued (--resume) or replaced (--overwrite), never silently; a directory
holding anything else is refused.

Defaults follow docs/DESIGN.md ("3. The SAE"). Scale-down rule for tiny models: unless given,
n_feat = min(2048, 2·K·V) and k = min(32, n_feat / 16), so a state with K·V ≥ 1024 gets the
paper's 2048 / 32 and only a smaller one is shrunk. The demo models' runs are short (2000 steps):
their default learning rate is 2e-3 → 2e-4 (docs/RESULTS.md, "The default run").
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist

import data
import writesae
from models.hub import atomic_write, load_pt, load_safetensors, read_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the arguments that may change between a run and its --resume
NOT_BINDING = ("resume", "max_steps", "device", "out", "log_every")
DEMO_LR = 2e-3  # the demo models' default --lr (see the docstring)


class Help(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # every set default visible in --help
        help = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in help
        return help + (f" (default: {action.default})" if shown else "")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line that names the flag (--help shows the usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(cast, ok, want):
    """An argparse type= that refuses a value outside its meaning (argparse names the flag)."""
    def parse(s):
        try:
            x = cast(s)
        except ValueError:
            x = None
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"want {want}, not {s!r}")
        return x
    return parse


count = checked(int, lambda n: n >= 1, "a positive integer")               # sizes, counts, periods
natural = checked(int, lambda n: n >= 0, "an integer ≥ 0")
rate = checked(float, lambda x: 0 < x < math.inf, "a positive number")     # nan is refused too
nonneg = checked(float, lambda x: 0 <= x < math.inf, "a number ≥ 0")
fraction = checked(float, lambda x: 0 < x < 1, "a number strictly between 0 and 1")


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=Help)
    add_site_args(p)
    add_data_args(p)
    add_sae_args(p)
    add_optim_args(p)
    add_run_args(p)
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEMO_LR if args.model.startswith("demo/") else 3e-4
    if args.lr_end is None:
        args.lr_end = args.lr / 10
    if args.lr_end > args.lr:
        p.error(f"argument --lr-end: {args.lr_end:g} is above the peak --lr {args.lr:g}")
    if args.resume and args.overwrite:
        p.error("argument --overwrite: not with --resume")
    return args


def add_site_args(p):
    p.add_argument("--model", default="demo/gdn",
                   help="Hub repo id, local checkpoint dir, or demo/<arch> (see demo/)")
    p.add_argument("--layer", type=natural, default=None,
                   help="a write layer (default: see default_site)")
    p.add_argument("--head", default=None,
                   help="a head, a list (1,2,5) or all: one SAE each, trained together "
                   "(default: see default_site)")
    p.add_argument("--write", choices=("additive", "increment"), default=None,
                   help="the native write eval.py substitutes (default: the model's); "
                   "the SAE input is always S_t")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="SAE and model device")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="model weights (recurrences run in fp32)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, World vocab .txt, or repo id (default: the checkpoint's)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls in SAE training on CUDA "
                   "(faster, ~1e-3 relative rounding); off otherwise, and always in extraction")


def add_data_args(p):
    p.add_argument("--data", nargs="+", default=["demo"],
                   help="text files, .jsonl with a text field, or demo")
    p.add_argument("--seq-len", type=count, default=256,
                   help="tokens per block; every block starts from S = 0")
    p.add_argument("--n-seqs", type=count, default=1000, help="at most this many blocks")
    p.add_argument("--val-frac", type=fraction, default=0.2, help="held-out share of the blocks")
    p.add_argument("--positions", default="32", type=positions_arg,
                   help="states per sequence and epoch: a number (random) or all")
    p.add_argument("--store-dtype", choices=data.STORE_DTYPES, default="float16",
                   help="see data.py's glossary")
    p.add_argument("--extract-batch", type=count, default=8,
                   help="blocks per model forward during extraction")
    p.add_argument("--store", default=None, help="factor store directory (default: <out>/store)")


def add_sae_args(p):
    p.add_argument("--variant", choices=writesae.VARIANTS, default="write", help="see writesae.py")
    p.add_argument("--rank", type=count, default=None, help="atom rank (default 1; 2 for RWKV-7)")
    p.add_argument("--n-feat", type=count, default=None,
                   help="dictionary size (default 2048, see the scale-down rule)")
    p.add_argument("--k", type=count, default=None,
                   help="active atoms per state (default 32, see the rule)")
    p.add_argument("--tied", action="store_true",
                   help="write variant: encoder factors = decoder factors")
    p.add_argument("--batch-topk", action="store_true", help="BatchTopK instead of TopK")
    p.add_argument("--k-aux", type=count, default=256, help="AuxK: dead atoms fit to the residual")
    p.add_argument("--lambda-aux", type=nonneg, default=1e-2,
                   help="AuxK weight (paper 1e-2, released code 1.0)")
    p.add_argument("--dead-after", type=count, default=100,
                   help="steps silent before an atom counts as dead")
    p.add_argument("--renorm-every", type=count, default=100,
                   help="decoder factors back to unit norm")
    p.add_argument("--resample-every", type=count, default=250,
                   help="dead atoms resampled (at most total/4)")


def add_optim_args(p):
    p.add_argument("--epochs", type=count, default=20, help="passes over the training blocks")
    p.add_argument("--batch", type=count, default=256, help="states per step (over all ranks)")
    p.add_argument("--lr", type=rate, default=None,
                   help="Adam peak learning rate (3e-4; demo models 2e-3)")
    p.add_argument("--lr-end", type=nonneg, default=None, help="cosine floor (default lr / 10)")
    p.add_argument("--warmup", type=natural, default=50,
                   help="linear warmup steps (at most total/4)")
    p.add_argument("--seed", type=int, default=42,
                   help="split, SAE init, positions and batch order")


def add_run_args(p):
    p.add_argument("--out", default=None,
                   help="run directory (default runs/<model>-L<layer>-H<heads>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (same arguments)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (the old SAE and eval/ go at its first save)")
    p.add_argument("--eval-every", type=count, default=None,
                   help="steps between validations (default: an epoch)")
    p.add_argument("--val-states", type=count, default=4096,
                   help="validation states (a fixed sample)")
    p.add_argument("--log-every", type=count, default=10,
                   help="steps between train records in metrics.jsonl")
    p.add_argument("--max-steps", type=count, default=None,
                   help="stop at this step as Ctrl-C does (save last/)")


def positions_arg(s: str) -> str:
    if s != "all" and not (s.isdigit() and int(s) > 0):
        raise argparse.ArgumentTypeError(f"want a positive number or all, not {s!r}")
    return s


def parse_heads(spec: str, n_heads: int) -> list[int]:
    if spec == "all":
        return list(range(n_heads))
    try:
        heads = [int(h) for h in spec.split(",")]
    except ValueError:
        raise ValueError(f"--head must be a number, a list like 1,2,5, or all; "
                         f"got {spec!r}") from None
    if len(set(heads)) != len(heads):
        raise ValueError(f"--head lists a head twice: {spec}")
    return heads


def default_site(name: str, model) -> tuple[int, int]:
    """--layer / --head defaults: a demo model's own site (demo/build.py DEMO_SITES), else the
    middle write layer and head 0."""
    from demo.build import DEMO_SITES
    site = DEMO_SITES.get(name.removeprefix("demo/")) if name.startswith("demo/") else None
    return site or (model.write_layers[len(model.write_layers) // 2], 0)


def default_out(model: str, layer: int, heads: list[int], n_heads: int) -> Path:
    repo = model.replace("/", "-").replace(":", "-")  # a repo id, repo:FILENAME, or demo/<arch>
    local = Path(model).expanduser().exists() and not model.startswith("demo/")
    name = Path(model).name if local else repo
    tag = "all" if heads == list(range(n_heads)) else "_".join(map(str, heads))
    return Path("runs") / f"{name}-L{layer}-H{tag}"


def set_tf32(on: bool):
    """TF32 for CUDA matmuls and convolutions, set explicitly either way (torch's defaults for
    the two differ)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    torch.set_float32_matmul_precision("high" if on else "highest")


def weight_fingerprint(model, piece=1 << 24) -> str:
    """sha256 of every parameter's name and bytes, read to the CPU `piece` elements at a time: a
    re-trained model differs, and no copy of a whole parameter is made on its device."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name} {p.dtype} {list(p.shape)}".encode())
        for i in range(0, flat.numel(), piece):
            h.update(flat[i:i + piece].cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def shared_blocks(args, tok, out, rank, world):
    """(blocks, train, val): rank 0 reads the corpus (streamed, only as far as --n-seqs blocks
    need), tokenises it and saves the blocks in `out` (with --overwrite, once the old run is set
    aside); the other ranks read those files. A failure on rank 0 stops every rank."""
    err = None
    if rank == 0:
        try:
            texts = data.read_texts(args.data)
            blocks = data.make_blocks(texts, tok, args.seq_len, args.n_seqs, names=args.data)
            train_ids, val_ids = data.split_blocks(len(blocks), args.val_frac, args.seed)
            out.mkdir(parents=True, exist_ok=True)
            if args.overwrite:
                set_aside(out)
            data.save_blocks(out, blocks, train_ids, val_ids)
        except (ValueError, OSError) as e:
            err = e
    if world > 1:  # also the barrier: the files are complete once rank 0 gets here
        msg = [None if err is None else str(err)]
        dist.broadcast_object_list(msg, 0)
        err = err or (ValueError(msg[0]) if msg[0] else None)
    if err:
        raise err
    return (blocks, train_ids, val_ids) if rank == 0 else data.load_blocks(out)


def git_commit() -> str | None:  # None outside a git checkout
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent)
    except OSError:
        return None
    return git.stdout.strip() or None


RUN_FILES = {"config.json", "blocks.json", "blocks.safetensors", "store", "metrics.jsonl", "best",
             "last", "eval", "replaced", "best.tmp", "best.old", "last.tmp", "last.old"}
PAST_EXTRACTION = ("config.json", "metrics.jsonl", "best", "last", "eval")  # needs a flag to touch


def check_out(out: Path, resume: bool, overwrite: bool):
    """Refuse an --out that is not a run directory, or whose run this would replace unasked."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    names = {f.name for f in out.iterdir()}
    if foreign := sorted(names - RUN_FILES):
        raise ValueError(f"--out {out} is not a train.py run directory (it holds {foreign[0]}): "
                         f"pick another --out")
    if "config.json" in names and "site" not in read_json(out / "config.json"):
        raise ValueError(f"--out {out} is not a train.py run directory (its config.json is not "
                         f"a run's)")
    if not (resume or overwrite) and names & set(PAST_EXTRACTION):
        raise ValueError(f"{out} holds a run: continue it with --resume, or replace it with "
                         f"--overwrite")


def recover(out: Path):
    """Finish what a crash interrupted: a swap of best/ or last/ (atomic_write), or an --overwrite
    whose new run stopped before its first checkpoint (the replaced run comes back)."""
    for name in ("last", "best"):
        if not (out / name).exists() and (out / f"{name}.old").exists():
            os.replace(out / f"{name}.old", out / name)
    old = out / "replaced"
    if old.is_dir() and any((out / name).exists() for name in ("best", "last")):
        shutil.rmtree(old)
    elif old.is_dir():
        for f in old.iterdir():
            os.replace(f, out / f.name)
        old.rmdir()


def set_aside(out: Path):
    """--overwrite: the old run (not its store: it is reused) into replaced/ until the new run's
    first checkpoint."""
    (out / "replaced").mkdir()
    for name in sorted(RUN_FILES - {"store", "replaced"}):
        if (out / name).exists():
            os.replace(out / name, out / "replaced" / name)


# ------------------------------------------------------------------------------------------------
# Several ranks: gradients averaged over the global batch, dead atoms counted over it,
# rank 0 breaks ties

class GlobalDeadTracker(writesae.DeadTracker):
    def update(self, codes):  # an atom fired in this step if it fired on any rank
        fired = (codes > 0).any(1).int()                                                 # [h,n]
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.steps = torch.where(fired.bool(), 0, self.steps + 1)


def average_grads(params, weight):
    """An optimiser pre-step hook: grad ← Σ_ranks (b_rank / batch) grad_rank, as one flat
    all-reduce."""
    def hook(opt, *_):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads]) * weight
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([q.numel() for q in params])):
            p.grad = g.view_as(p)
    return hook


def broadcast_state(sae, opt):
    tensors = [*sae.parameters(), *sae.buffers()]
    moments = [v for p in sae.parameters() for v in opt.state.get(p, {}).values()]
    tensors += [v for v in moments if torch.is_tensor(v) and v.dim()]
    flat = torch.cat([t.detach().flatten() for t in tensors])
    dist.broadcast(flat, 0)
    with torch.no_grad():
        for t, x in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(x.view_as(t))


def reduce_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def validate(sae, batches, world) -> dict:
    """Validation MSE (per element), FVE = 1 − SSE / SST (SST about the validation mean), L0,
    alive atoms."""
    sae.eval()
    h, n, K, V = sae.cfg.n_sae, sae.cfg.n_feat, sae.cfg.d_k, sae.cfg.d_v
    dev = sae.b_dec.device
    sums = torch.zeros(4, h, dtype=torch.float64, device=dev)      # count, SSE, Σ‖S‖², Σ L0
    total = torch.zeros(h, K, V, dtype=torch.float64, device=dev)  # Σ S
    fired = torch.zeros(h, n, dtype=torch.float64, device=dev)     # states each atom was active on
    for S in batches:                                              # [h,B,K,V]
        out = sae(S)
        active = (out.codes > 0).double()                          # [h,B,n]
        sums += torch.stack([torch.full((h,), S.shape[1], device=dev),
                             (S - out.recon).pow(2).sum((1, 2, 3)),
                             S.pow(2).sum((1, 2, 3)),
                             active.sum((1, 2))]).double()
        total += S.sum(1)
        fired += active.sum(1)
    count, sse, ss, l0 = reduce_sum(sums, world)
    total = reduce_sum(total, world)
    alive = reduce_sum(fired, world) > 0
    sst = ss - total.pow(2).sum((1, 2)) / count
    per_head = {"mse": (sse / (count * K * V)).tolist(), "fve": (1 - sse / sst).tolist(),
                "l0": (l0 / count).tolist(), "alive": alive.sum(-1).int().tolist()}
    sae.train()
    means = {k: sum(v) / h for k, v in per_head.items() if k != "alive"}
    n_alive = sum(per_head["alive"])
    return {**means, "alive": n_alive, "dead": h * n - n_alive, "heads": per_head}


# ------------------------------------------------------------------------------------------------
# The run, top-down: ranks → site → factor store → SAE → training loop (checkpoints inside)

@dataclass
class Ranks:
    """This process under torchrun (world 1, rank 0 without it); rank 0 writes and prints."""
    world: int
    rank: int
    device: str

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def say(self, *words):
        if self.rank == 0:
            from tqdm import tqdm
            tqdm.write(" ".join(map(str, words)))


@dataclass
class Site:
    """The (layer, heads) the SAEs read, the state's shape, and the run directory."""
    arch: str
    layer: int
    heads: list[int]
    K: int
    V: int
    write: str
    sae_rank: int          # the model's default atom rank (the model is freed after extraction)
    out: Path


@dataclass
class Factors:
    """The token blocks, their train / val split, and the factor store extracted from them."""
    blocks: torch.Tensor   # [N,T] token ids
    train_ids: list[int]
    val_ids: list[int]
    store: data.FactorStore
    store_dir: Path


def setup_ranks(device: str) -> Ranks:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK: a process group and, on CUDA, one GPU a rank."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(world, rank, device)


def open_site(args, ranks: Ranks):
    """(model, tokenizer, site): the checkpoint, its checked (layer, heads), and a run directory
    that is safe to write (crash leftovers recovered, a run never replaced unasked)."""
    from models import load_model
    set_tf32(False)  # extraction's model forward in full fp32
    model, tok = load_model(args.model, device=ranks.device, dtype=DTYPES[args.dtype],
                            revision=args.revision, tokenizer=args.tokenizer)
    layer, head = default_site(args.model, model)
    layer = layer if args.layer is None else args.layer
    model.check_site(layer)
    heads = parse_heads(str(head) if args.head is None else args.head, model.n_heads)
    for h in heads:
        model.check_site(layer, h)
    out = Path(args.out) if args.out else default_out(args.model, layer, heads, model.n_heads)
    if ranks.rank == 0:
        recover(out)
    ranks.barrier()
    check_out(out, args.resume, args.overwrite)
    if args.resume:
        check_resume(args, out)
    K, V = model.state_shape
    write = model.default_write if args.write is None else args.write
    return model, tok, Site(model.arch, layer, heads, K, V, write, model.sae_rank, out)


def check_resume(args, out: Path):
    """--resume: a last/ checkpoint to continue, and the run's own arguments (but NOT_BINDING)."""
    if not (out / "last" / "train_state.pt").exists():
        raise ValueError(f"nothing to resume in {out}: no last/ checkpoint")
    saved = read_json(out / "config.json")["args"]
    for k, v in saved.items():
        if k not in NOT_BINDING and v != vars(args).get(k):
            raise ValueError(f"--resume needs the run's arguments: it used "
                             f"--{k.replace('_', '-')} {v}, not {vars(args).get(k)}")


def build_store(args, model, tok, site: Site, ranks: Ranks) -> Factors:
    """The blocks (shared_blocks) and their factor store: reused when its key (weights, tokens,
    layer, heads, dtype) matches, else extracted, each rank a share of the blocks."""
    blocks, train_ids, val_ids = shared_blocks(args, tok, site.out, ranks.rank, ranks.world)
    store_dir = Path(args.store) if args.store else site.out / "store"
    weights = weight_fingerprint(model)
    key = {"checkpoint": args.model, "weights": weights, "tokens": data.fingerprint(blocks),
           "layer": site.layer, "heads": site.heads, "dtype": args.store_dtype}
    store = data.FactorStore.open(store_dir)
    reuse = store is not None and all(store.meta.get(k) == v for k, v in key.items())
    ranks.barrier()
    if reuse:
        ranks.say(f"reusing the factor store in {store_dir}")
    else:
        barrier = dist.barrier if ranks.world > 1 else None
        store = data.extract(model, blocks, site.layer, site.heads, store_dir, args.store_dtype,
                             args.extract_batch, ranks.rank, ranks.world, barrier,
                             progress=ranks.rank == 0, checkpoint=args.model, weights=weights,
                             tokens=key["tokens"])
    ranks.say(f"factor store: {store.bytes_per_token_head()} bytes a token a head "
              f"({args.store_dtype}) instead of {site.K * site.V * 4} for the fp32 state")
    return Factors(blocks, train_ids, val_ids, store, store_dir)


def sae_config(args, site: Site) -> writesae.SAEConfig:
    """The flags as an SAEConfig, with the scale-down rule for n_feat and k (module docstring)."""
    n_feat = min(2048, 2 * site.K * site.V) if args.n_feat is None else args.n_feat
    return writesae.SAEConfig(
        d_k=site.K, d_v=site.V, variant=args.variant, n_feat=n_feat,
        rank=site.sae_rank if args.rank is None else args.rank,
        k=min(32, max(1, n_feat // 16)) if args.k is None else args.k,
        tied=args.tied, batch_topk=args.batch_topk, k_aux=args.k_aux,
        lambda_aux=args.lambda_aux, dead_after=args.dead_after, renorm_every=args.renorm_every,
        resample_every=args.resample_every, n_sae=len(site.heads), lr=args.lr,
        lr_end=args.lr_end, warmup=args.warmup)


@dataclass
class Training:
    """What the loop reads and advances: the SAEs, their optimiser and dead-atom tracker, the
    loaders, the step counters, and (rank 0) the open metrics.jsonl."""
    args: argparse.Namespace
    ranks: Ranks
    out: Path
    cfg: writesae.SAEConfig
    sae: writesae.WriteSAE
    opt: torch.optim.Optimizer
    tracker: writesae.DeadTracker
    loader: data.StateLoader
    val_loader: data.StateLoader
    val_steps: int
    batch: int             # states per step over all ranks (loader.batch is this rank's share)
    per_seq: int           # states a sequence gives an epoch
    total: int
    eval_every: int
    step: int = 0
    best: float = math.inf
    saved_at: int | None = None
    metrics: TextIO | None = None

    def record(self, rec: dict):
        if self.ranks.rank == 0:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()

    def evaluate(self) -> dict:
        v = validate(self.sae, itertools.islice(self.val_loader.epoch(0), self.val_steps),
                     self.ranks.world)
        self.record({"step": self.step, "val": v})
        self.ranks.say(f"step {self.step:6d} | val FVE {v['fve']:.3f} | mse {v['mse']:.3e} | "
                       f"L0 {v['l0']:.1f} | alive {v['alive']}/{self.cfg.n_feat * self.cfg.n_sae}")
        return v

    def save(self, name: str, with_state: bool):
        """best/ or last/ (with train_state.pt) written beside and swapped in, by rank 0."""
        def write(d):
            self.sae.save(d)
            if with_state:
                torch.save({"step": self.step, "opt": self.opt.state_dict(),
                            "tracker": self.tracker.state_dict(), "rng": torch.get_rng_state(),
                            "best": self.best}, d / "train_state.pt")
        if self.ranks.rank == 0:
            atomic_write(self.out / name, write)
            # --overwrite: the new run has a checkpoint, so the replaced one goes
            shutil.rmtree(self.out / "replaced", ignore_errors=True)

    def checkpoint(self):
        """Validate; best/ when the val MSE improves; last/ always."""
        v = self.evaluate()
        if v["mse"] < self.best:
            self.best = v["mse"]
            self.save("best", False)
        self.save("last", True)
        self.saved_at = self.step


def build_sae(args, site: Site, factors: Factors, ranks: Ranks) -> Training:
    """SAE config, loaders, SAE, optimiser and tracker; then the resumed state, or b_dec at the
    mean training state."""
    set_tf32(args.tf32)
    cfg = sae_config(args, site)
    device = ranks.device
    positions = args.positions if args.positions == "all" else int(args.positions)
    m = args.seq_len if positions == "all" else min(positions, args.seq_len)
    batch = min(args.batch, len(factors.train_ids) * m)
    if batch < args.batch:
        ranks.say(f"note: --batch {args.batch} is more than the {batch} training states an epoch "
                  f"has; using {batch}")
    loader = data.StateLoader(factors.store, factors.train_ids, positions, batch, device,
                              args.seed, ranks.rank, ranks.world)
    val_batch = min(args.batch, len(factors.val_ids) * m)
    val_loader = data.StateLoader(factors.store, factors.val_ids, positions, val_batch, device,
                                  args.seed + 1, ranks.rank, ranks.world)
    val_steps = min(val_loader.steps, max(1, args.val_states // val_batch))
    if min(loader.steps, val_steps) < 1:
        raise ValueError(f"too few blocks for {ranks.world} ranks: {len(factors.train_ids)} train "
                         f"/ {len(factors.val_ids)} val blocks")
    sae = writesae.WriteSAE(cfg, seed=args.seed).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    tracker = (GlobalDeadTracker if ranks.world > 1 else writesae.DeadTracker)(cfg, device=device)
    if ranks.world > 1:
        opt.register_step_pre_hook(average_grads(list(sae.parameters()), loader.batch / batch))
    eval_every = loader.steps if args.eval_every is None else args.eval_every
    t = Training(args, ranks, site.out, cfg, sae, opt, tracker, loader, val_loader, val_steps,
                 batch, m, args.epochs * loader.steps, eval_every)
    if args.resume:
        resume(t)
    else:
        mean, n = loader.mean_state()
        mean = reduce_sum(mean, ranks.world)
        n = reduce_sum(torch.tensor(float(n), dtype=torch.float64, device=mean.device), ranks.world)
        sae.init_b_dec_((mean / n).float())                          # M = the mean training state
    return t


def resume(t: Training):
    """The SAE, optimiser, tracker, RNG and counters of last/."""
    last = t.out / "last"
    t.sae.load_state_dict(load_safetensors(last / "sae.safetensors", device=t.ranks.device))
    state = load_pt(last / "train_state.pt")
    t.opt.load_state_dict(state["opt"])
    t.tracker.load_state_dict(state["tracker"])
    torch.set_rng_state(state["rng"])
    t.step = state["step"]
    t.best = state["best"]
    t.saved_at = state["step"]
    t.ranks.say(f"resuming {t.out} at step {t.step}")


def open_metrics(t: Training, site: Site, factors: Factors):
    """Rank 0: config.json (a new run), and metrics.jsonl cut back to the resumed step."""
    if t.ranks.rank != 0:
        return
    args, out = t.args, t.out
    site_cfg = {"arch": site.arch, "layer": site.layer, "heads": site.heads, "K": site.K,
                "V": site.V, "write": site.write}
    data_cfg = {"n_blocks": len(factors.blocks), "train_blocks": len(factors.train_ids),
                "val_blocks": len(factors.val_ids), "positions": t.per_seq, "batch": t.batch,
                "steps_per_epoch": t.loader.steps, "total_steps": t.total,
                "store": str(factors.store_dir)}
    run_cfg = {"args": vars(args), "git_commit": git_commit(), "torch": torch.__version__,
               "world": t.ranks.world, "site": site_cfg, "sae": asdict(t.cfg), "data": data_cfg}
    if not args.resume:
        (out / "config.json").write_text(json.dumps(run_cfg, indent=1) + "\n")
    log = []
    if args.resume and (out / "metrics.jsonl").exists():
        lines = (out / "metrics.jsonl").read_text().splitlines()
        log = [line for line in lines if json.loads(line)["step"] <= t.step]
    t.metrics = open(out / "metrics.jsonl", "w")
    t.metrics.writelines(line + "\n" for line in log)


TRAIN_STATS = ("loss", "mse", "aux", "fve", "l0")  # averaged over ranks into metrics.jsonl


def training_loop(t: Training, site: Site) -> bool:
    """Train to the end, to --max-steps, or to Ctrl-C / SIGTERM (last/ saved first); True when a
    signal stopped it. Closes metrics.jsonl and the process group whatever happens."""
    from tqdm import tqdm
    args, ranks = t.args, t.ranks
    if not args.resume and not t.cfg.batch_topk:  # the baseline (BatchTopK has no threshold yet)
        t.evaluate()
    stop = []  # set by Ctrl-C / SIGTERM; acted on once all ranks know (see train_steps)
    handlers = {s: signal.signal(s, lambda *_: stop.append(1))
                for s in (signal.SIGINT, signal.SIGTERM)}
    desc = f"train L{site.layer} H{args.head or site.heads[0]}"
    bar = tqdm(total=t.total, initial=t.step, desc=desc, disable=ranks.rank != 0, unit="step")
    try:
        halt = train_steps(t, stop, bar)
        if t.step < t.total:
            if t.saved_at != t.step:
                t.save("last", True)
            ranks.say(f"stopped at step {t.step}/{t.total}: saved {t.out}/last; continue with the "
                      f"same command and --resume")
        else:
            ranks.say(f"done: best val MSE {t.best:.3e}; the SAE is in {t.out}/best")
        ranks.barrier()  # every rank done (and rank 0 done writing) before any tears gloo down
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        if ranks.rank == 0:
            t.metrics.close()
        if ranks.world > 1:
            dist.destroy_process_group()
    return halt


def train_steps(t: Training, stop: list, bar) -> bool:
    """The steps from t.step on; True when a signal (on any rank) stopped them."""
    ranks, cfg = t.ranks, t.cfg
    period = min(cfg.resample_every, max(t.total // 4, 1))  # writesae.train_step's resampling
    halt = 0
    for S in t.loader.batches(t.step) if t.step < t.total else ():
        stats = writesae.train_step(t.sae, t.opt, S, t.step, t.tracker, t.total)
        if ranks.world > 1 and (cfg.batch_topk or (t.step > 0 and t.step % period == 0)):
            broadcast_state(t.sae, t.opt)
        # the stop flag rides as the last entry of the step's all-reduce: every rank sees it
        local = [stats[k] * t.loader.batch / t.batch for k in TRAIN_STATS] + [len(stop)]
        *vals, halt = reduce_sum(torch.tensor(local, dtype=torch.float64, device=S.device),
                                 ranks.world).tolist()
        if not all(map(math.isfinite, vals)):
            last = f"(step {t.saved_at})" if t.saved_at is not None else "(none yet)"
            raise ValueError(f"loss is {vals[0]} at step {t.step}: stopped; the last good "
                             f"checkpoint {last} is {t.out}/last")
        t.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{vals[0]:.3g}", fve=f"{vals[3]:.3f}", dead=stats["dead"])
        if t.step % t.args.log_every == 0:
            t.record({"step": t.step, "train": {**dict(zip(TRAIN_STATS, vals)),
                                                "dead": stats["dead"], "lr": stats["lr"]}})
        if t.step % t.eval_every == 0 or t.step == t.total:
            t.checkpoint()
        if halt or t.step in (t.args.max_steps, t.total):
            break
    return bool(halt)


def run(args) -> Path:
    """One training run: the steps below, in order; returns the run directory."""
    ranks = setup_ranks(args.device)
    torch.manual_seed(args.seed)
    model, tok, site = open_site(args, ranks)
    factors = build_store(args, model, tok, site, ranks)
    del model
    t = build_sae(args, site, factors, ranks)
    open_metrics(t, site, factors)
    if training_loop(t, site):  # Ctrl-C / SIGTERM: saved; the exit status says it did not finish
        raise KeyboardInterrupt
    return site.out


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # bad input: one line that names it (CheckpointError too)
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:  # in training, last/ is saved first; before it, a rerun starts over
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
