"""Real checkpoints (docs/REAL_CHECKPOINTS.md), offline on tiny models: RWKV World ids without a
vocabulary entry, BlinkDL repos of many .pth files (repo:FILENAME, a local file, --tokenizer,
--revision, the World vocabulary fallback), which files a Hub download fetches, the streamed corpus
read by rank 0 only, fp32 eval and TF32, the weight fingerprint, and the documented commands against
the run directory train.py writes."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from test_hub import populate_hf_cache
from test_rwkv7 import vocab_file

import data
import eval as ev
import train
import writesae
from models import hub, load_model, rwkv7

ROOT = Path(__file__).resolve().parent.parent
WORLD = 65536  # the rows of a World head (65529 vocabulary entries + padding)
WORDS = "the state of a recurrent model keeps one matrix per head and every token writes".split()
REPO = "tiny-org/rwkv-7-tiny"


def blinkdl_pth(path, vocab=WORLD, C=16, H=2, layers=2, seed=0):
    """A random RWKV-7 state dict in BlinkDL's names and shapes (head size C/H), saved as a .pth."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=0.3: torch.randn(*s, generator=g) * scale  # noqa: E731
    one, zero = torch.ones(C), torch.zeros(C)
    sd = {"emb.weight": rnd(vocab, C, scale=1.0), "head.weight": rnd(vocab, C, scale=C ** -.5),
          "blocks.0.ln0.weight": one, "blocks.0.ln0.bias": zero,
          "ln_out.weight": one, "ln_out.bias": zero}
    for i in range(layers):
        p = f"blocks.{i}."
        for n in ("ln1", "ln2", "att.ln_x"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = one, zero
        for m in "rwkvag":
            sd[p + f"att.x_{m}"] = torch.rand(1, 1, C, generator=g)
        for m in "wavg":
            if m != "g":
                sd[p + f"att.{m}0"] = rnd(1, 1, C)
            sd[p + f"att.{m}1"], sd[p + f"att.{m}2"] = rnd(C, 8), rnd(8, C)
        sd[p + "att.k_k"], sd[p + "att.k_a"] = 1 + rnd(1, 1, C), 1 + rnd(1, 1, C)
        sd[p + "att.r_k"] = rnd(H, C // H)
        for n in ("receptance", "key", "value", "output"):
            sd[p + f"att.{n}.weight"] = rnd(C, C, scale=C ** -.5)
        sd[p + "ffn.x_k"] = torch.rand(1, 1, C, generator=g)
        sd[p + "ffn.key.weight"], sd[p + "ffn.value.weight"] = rnd(2 * C, C), rnd(C, 2 * C)
    torch.save(sd, path)
    return path


def word_tokenizer(path):
    """A whitespace word-level tokenizer.json over WORDS (ids 2..), <|endoftext|> = 0."""
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def prose(n_lines, seed=0):
    import random
    g = random.Random(seed)
    return "".join(" ".join(g.choice(WORDS) for _ in range(10)) + ".\n" for _ in range(n_lines))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline HF cache holding a BlinkDL-style repo: two World-sized .pth releases, no
    vocabulary."""
    from huggingface_hub import constants
    src = tmp_path / "src"
    src.mkdir()
    names = ("RWKV-x070-a.pth", "RWKV-x070-b.pth")
    files = {n: blinkdl_pth(src / n, seed=i) for i, n in enumerate(names)}
    cache = tmp_path / "hf" / "hub"
    sha = populate_hf_cache(cache, REPO, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import: patch it live
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return src, sha


# ---- 1. RWKV World ids without an entry ----------------------------------------------------------

def test_world_ids_past_the_vocabulary_never_stop_an_experiment(tmp_path):
    """A 65536-row World head scores ids 65530..65535, which the vocabulary lacks: they decode as
    placeholders, and the experiments that decode (amplify: every row; erase: the preferred token)
    run through."""
    (tmp_path / rwkv7.WORLD_VOCAB).symlink_to(vocab_file())
    model, tok = load_model(blinkdl_pth(tmp_path / "world.pth"))
    assert isinstance(tok, rwkv7.WorldTokenizer) and model.lm_head_weight().shape[0] == WORLD
    assert tok.decode([65531]) == "<id 65531>" and tok.decode(tok.encode("a b.\n")) == "a b.\n"
    blocks = torch.randint(WORLD, (4, 24), generator=torch.Generator().manual_seed(0))
    blocks[:, ::3] = tok.encode("\n")[0]
    blocks[:, 2::3] = tok.encode(".")[0]  # amplify selects its features before '.'
    blocks[:, 1::5] = torch.arange(WORLD - 5, WORLD)  # 65531 .. 65535 in every block
    K, V = model.state_shape
    sae = writesae.WriteSAE(writesae.SAEConfig(d_k=K, d_v=V, n_feat=16, k=4, rank=2), seed=0)
    site = ev.make_site(model, tok, sae, 0, 1, 0, model.default_write)
    args = ev.parse_args(["--exp", "amplify,erase", "--erase-n", "4", "--amp-prompts", "2",
                          "--amp-prompt-len", "6", "--amp-len", "4", "--amp-features", "2",
                          "--boot", "50"])
    res = ev.evaluate(site, blocks, args)
    assert set(res["amplify"]["conditions"]) == {"amplify 2x", "amplify 5x", "amplify 10x",
                                                 "random 10x"}
    assert isinstance(res["erase"]["preferred_text"], str)


def test_world_vocabulary_fallback_only_for_world_sized_heads(tmp_path):
    torch.save({}, tmp_path / "model.pth")
    assert isinstance(rwkv7.load_tokenizer(tmp_path / "model.pth", WORLD), rwkv7.WorldTokenizer)
    with pytest.raises(hub.CheckpointError, match="no rwkv_vocab_v20230424.txt .*--tokenizer"):
        rwkv7.load_tokenizer(tmp_path / "model.pth", 50304)  # a Pile model: GPT-NeoX ids


# ---- 2. BlinkDL repos: repo:FILENAME, a local file, --tokenizer, --revision ----------------------

def test_repo_filename_and_a_local_file_load_that_file_only(hf_cache):
    src, sha = hf_cache
    for name in ("RWKV-x070-a.pth", "RWKV-x070-b.pth"):
        want = torch.load(src / name)["emb.weight"]
        for kw in ({}, {"revision": sha}):
            model, tok = load_model(f"{REPO}:{name}", **kw)
            assert torch.equal(model.model.embeddings.weight, want)
            assert isinstance(tok, rwkv7.WorldTokenizer)  # the rwkv wheel's World vocabulary
        model, _ = load_model(src / name)
        assert torch.equal(model.model.embeddings.weight, want)
    with pytest.raises(hub.CheckpointError, match=r"several \.pth files.*repo:FILENAME"):
        load_model(REPO)
    with pytest.raises(hub.CheckpointError, match="has no file 'RWKV-x070-c.pth'"):
        load_model(f"{REPO}:RWKV-x070-c.pth")
    with pytest.raises(hub.CheckpointError, match=f"cannot find 'RWKV-x070-b.pth' in '{REPO}'"):
        load_model(f"{REPO}:RWKV-x070-b.pth", revision="f" * 40)


def test_train_and_eval_take_tokenizer_and_revision(hf_cache, tmp_path, monkeypatch):
    """train.py --model repo:FILENAME --revision --tokenizer into its default run directory (at a
    non-default layer and head); eval.py --model --layer --head finds that directory and loads the
    run's revision and tokenizer; TF32 is on in training with --tf32 and off in eval."""
    _, sha = hf_cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(prose(120))
    word_tokenizer(tmp_path / "words.json")
    name = f"{REPO}:RWKV-x070-b.pth"
    argv = ["--model", name, "--layer", "0", "--head", "1", "--data", "corpus.txt",
            "--seq-len", "24", "--n-seqs", "20", "--epochs", "1", "--n-feat", "16", "--k", "4",
            "--batch", "32", "--device", "cpu"]
    with pytest.raises(SystemExit, match="cannot find 'RWKV-x070-b.pth'"):
        train.main(argv + ["--revision", "f" * 40])
    try:
        out = train.main(argv + ["--revision", sha, "--tokenizer", "words.json", "--tf32"])
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        train.set_tf32(False)
    assert out == train.default_out(name, 0, [1], 2) and (out / "best").is_dir()
    blocks, _, _ = data.load_blocks(out)
    words = hub.load_tokenizer(tmp_path / "words.json")
    assert blocks.flatten().tolist() == words.encode(prose(120))[:blocks.numel()]
    calls = []  # eval's load_model calls, passed through
    monkeypatch.setattr(ev, "load_model", lambda *a, **kw: calls.append(kw) or load_model(*a, **kw))
    torch.backends.cuda.matmul.allow_tf32 = True
    ev.main(["--model", name, "--layer", "0", "--head", "1", "--exp", "partition",
             "--device", "cpu"])
    assert (out / "eval" / "report.json").exists() and not torch.backends.cuda.matmul.allow_tf32
    assert calls[-1]["revision"] == sha and calls[-1]["tokenizer"] == "words.json"
    with pytest.raises(ValueError, match="--dtype bfloat16: .*float32"):
        ev.main(["--run", str(out), "--dtype", "bfloat16"])


# ---- 3. which files a Hub download fetches -------------------------------------------------------

SHARDS = [f"model.safetensors-0000{i}-of-00002.safetensors" for i in (1, 2)]
LISTINGS = [  # (repo files, what the loader reads)
    (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md",
      ".gitattributes", "onnx/model.safetensors", "tokenizer_config.json"],
     ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]),
    (["config.json", "model.safetensors.index.json", *SHARDS, "pytorch_model-00001-of-00002.bin"],
     ["config.json", "model.safetensors.index.json", *SHARDS]),
    (["config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
     ["config.json", "pytorch_model.bin"]),
    (["rwkv_vocab_v20230424.txt", "RWKV-x070-World-0.1B.pth", "README.md"],
     ["rwkv_vocab_v20230424.txt", "RWKV-x070-World-0.1B.pth"]),
]


@pytest.mark.parametrize("names, want", LISTINGS)
def test_hub_files_are_what_the_loader_reads(names, want, tmp_path):
    got = hub.hub_files(names, "org/x")
    assert sorted(got) == sorted(want)
    for n in names:  # the same files on disk: weight_files picks exactly the chosen weights
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("")
    if "model.safetensors.index.json" in names:
        index = {"weight_map": dict(zip("ab", SHARDS))}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = {f.name for f in hub.weight_files(tmp_path)}
    assert weights == {n for n in got if not n.endswith((".json", ".txt"))}


def test_hub_files_blinkdl_repo_and_errors():
    names = ["README.md", "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", "RWKV-x070-0.4B.pth"]
    with pytest.raises(hub.CheckpointError, match=r"holds 2 \.pth .*name one as org/x:FILENAME"):
        hub.hub_files(names, "org/x")
    assert hub.hub_files(names, "org/x", names[1]) == [names[1]]
    assert hub.split_repo_file(f"org/x:{names[1]}") == ("org/x", names[1])
    assert hub.split_repo_file("org/x") == ("org/x", None)
    with pytest.raises(hub.CheckpointError, match="org/x has no file 'a.pth'"):
        hub.hub_files(names, "org/x", "a.pth")
    with pytest.raises(hub.CheckpointError, match="no weights in org/x"):
        hub.hub_files(["README.md", "onnx/model.safetensors"], "org/x")


# ---- 4. the streamed corpus ----------------------------------------------------------------------

def test_corpus_is_read_only_as_far_as_the_blocks_need(tmp_path):
    """Files whose tail is not UTF-8 / not JSON: nothing past the needed tokens is read, so they
    load; read to the end, they fail with the file named."""
    tok = hub.load_tokenizer(word_tokenizer(tmp_path / "words.json"))
    good = prose(400)
    lines = [json.dumps({"text": line + "\n"}) for line in good.splitlines()]
    files = {"a.txt": good.encode() + b"state\xff\xfe\n" * 10,
             "big.txt": good.encode() + b"model keeps\n" * 300_000 + b"\xff",  # past 1M characters
             "a.jsonl": "\n".join(lines).encode() + b"\n{not json\n\xff\n",
             "b.jsonl": "\n".join(lines).encode() + b"\n{not json\n"}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    want = torch.tensor(tok.encode(good)[:32 * 40]).view(40, 32).int()

    def blocks(name, n_seqs=40, **kw):
        return data.make_blocks(data.read_texts([str(tmp_path / name)], **kw), tok, 32, n_seqs)

    assert torch.equal(blocks("a.txt", chunk=512), want)
    for name in ("big.txt", "a.jsonl", "b.jsonl"):
        assert torch.equal(blocks(name), want)
    with pytest.raises(ValueError, match="cannot read corpus file .*a.txt"):
        blocks("a.txt", None, chunk=512)
    with pytest.raises(ValueError, match=rf"b.jsonl line {len(lines) + 1}: not a JSON object"):
        blocks("b.jsonl", None)


def test_only_rank_0_reads_the_corpus(tmp_path):
    """Under torchrun rank 0 tokenises and saves the blocks; another rank reads those, never the
    corpus."""
    tok = hub.load_tokenizer(word_tokenizer(tmp_path / "words.json"))
    (tmp_path / "a.txt").write_text(prose(100))
    args = train.parse_args(["--data", str(tmp_path / "a.txt"), "--seq-len", "16",
                             "--n-seqs", "30"])
    blocks, tr, val = train.shared_blocks(args, tok, tmp_path / "run", rank=0, world=1)
    (tmp_path / "a.txt").unlink()
    again, tr1, val1 = train.shared_blocks(args, tok, tmp_path / "run", rank=1, world=1)
    assert torch.equal(blocks, again) and (tr, val) == (tr1, val1) and blocks.shape == (30, 16)
    with pytest.raises(ValueError, match="cannot read corpus file"):
        train.shared_blocks(args, tok, tmp_path / "run", rank=0, world=1)


# ---- 6. the weight fingerprint -------------------------------------------------------------------

def test_weight_fingerprint_copies_no_parameter():
    from bench import peak_memory
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 8))
    big = 1024 * 1024 * 4 / 2**20                                     # MB of the largest parameter
    assert peak_memory(lambda: model, train.weight_fingerprint) < big / 4
    a = train.weight_fingerprint(model)
    assert a == train.weight_fingerprint(model) == train.weight_fingerprint(model, piece=1000)
    with torch.no_grad():
        model[1].weight[3, 5] += 1e-6
    assert train.weight_fingerprint(model) != a
    assert train.weight_fingerprint(model.bfloat16()) != train.weight_fingerprint(model.float())


# ---- 7. the documented real-checkpoint commands --------------------------------------------------

N_HEADS = {  # state heads of the documented checkpoints (from their config files; the World 0.1B: 768 / 64)
    "Qwen/Qwen3.5-0.8B": 16, "state-spaces/mamba2-370m": 32, "fla-hub/rwkv7-1.5B-world": 32,
    "BlinkDL/rwkv-7-world:RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth": 12}


def commands(doc):
    """(program, {flag: value}) of every python / torchrun command in the bash blocks of a file."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0])
            prog = next((w for w in words if w.endswith(".py")), None)
            if prog:
                rest = words[words.index(prog) + 1:]
                flags = {a: b for a, b in zip(rest, rest[1:] + [""]) if a.startswith("--")}
                out.append((prog, flags))
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/REAL_CHECKPOINTS.md"])
def test_documented_eval_runs_are_the_directories_train_writes(doc):
    pairs, last = [], None
    for prog, flags in commands(doc):
        if prog == "train.py" and "--model" in flags:
            last = flags
        elif prog == "eval.py" and "--run" in flags and last is not None:
            pairs.append((last, flags["--run"]))
    assert pairs, f"{doc} pairs no train.py command with an eval.py --run"
    for t, run in pairs:
        m, n = t["--model"], N_HEADS[t["--model"]]
        want = train.default_out(m, int(t["--layer"]), train.parse_heads(t["--head"], n), n)
        want = Path(t["--out"]) if "--out" in t else want
        assert Path(run) == want, f"{doc}: eval.py --run {run}, but train.py {m} writes {want}"
