"""Reading checkpoints from the Hugging Face Hub or a local directory.

Glossary
  name_or_path  a Hub repo id ("Qwen/Qwen3.5-0.8B"), "repo:filename" for one weight file of a repo
                ("BlinkDL/rwkv-7-world:RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth"), or a local
                directory / file
  revision      a Hub branch, tag or commit (ignored for local paths)
  state dict    {tensor name: tensor}, read from whatever the checkpoint ships:
                a sharded safetensors index (model.safetensors.index.json, any shard names),
                a single *.safetensors, a pytorch_model.bin, or a BlinkDL *.pth

Resolution goes through huggingface_hub, so HF_HUB_OFFLINE=1, the HF cache and revision= behave
as they do for transformers. A repo id downloads only the files the loader reads (hub_files: the
weights weight_files would pick, and the top-level .json / .txt beside them); "repo:filename" only
that file. Nothing here knows about any architecture.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

WEIGHT_ORDER = ("*.safetensors", "pytorch_model*.bin", "*.pth")  # precedence, first match wins


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file or tensor."""


# One reader per file format, used for every file the project reads back (checkpoints, SAEs, runs):
# a missing, truncated or corrupt file is a CheckpointError of one line that names it.

def read_json(path) -> dict:
    """A JSON object from a file."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def load_safetensors(path, device="cpu", metadata=False):
    """{name: tensor} of a .safetensors file (and its metadata dict when metadata=True)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            tensors, meta = {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupt?)") from None
    return (tensors, meta) if metadata else tensors


def load_pt(path, **kw):
    """A torch.save / .bin / .pth file, weights_only=True: tensors and plain containers, no code."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds Python objects that torch.load(weights_only=True) "
                              f"refuses to run: convert it to a state dict of tensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {why} (truncated or corrupt?)") from None


def atomic_write(path, write):
    """write(tmp) a file or a directory beside `path`, then rename it into place: a crash leaves the
    old `path` or the new one, never a half-written one (a directory swaps through `path`.old)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    write(tmp)
    if tmp.is_dir() and path.exists():  # os.replace cannot put a directory over another
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def split_repo_file(name: str) -> tuple[str, str | None]:
    """"repo:filename" -> (repo, filename); a plain repo id -> (repo, None)."""
    repo, sep, filename = str(name).partition(":")
    return (repo, filename) if sep and filename else (str(name), None)


def hub_files(names: list[str], repo: str = "the repo", filename: str | None = None) -> list[str]:
    """Of a repo's file names, those the loader reads: the top-level .json / .txt (config, index,
    tokenizer, vocabularies) and the weights: `filename` if named, else the first kind in
    WEIGHT_ORDER (as weight_files picks)."""
    from fnmatch import fnmatch
    top = [n for n in names if "/" not in n]
    meta = [n for n in top if n.endswith((".json", ".txt"))]
    if filename is not None:
        if filename not in names:
            raise CheckpointError(f"{repo} has no file {filename!r}")
        return sorted(set(meta) | {filename})
    for pattern in WEIGHT_ORDER:
        found = sorted(n for n in top if fnmatch(n, pattern))
        if pattern == "*.pth" and len(found) > 1:  # BlinkDL repos: a release a file, GBs each
            raise CheckpointError(f"{repo} holds {len(found)} .pth files ({', '.join(found[:2])}, "
                                  f"...): name one as {repo}:FILENAME")
        if found:
            return meta + found
    raise CheckpointError(f"no weights in {repo} (looked for {', '.join(WEIGHT_ORDER)})")


def offline() -> bool:  # huggingface_hub reads HF_HUB_OFFLINE once, at import: look at both
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return bool(constants.HF_HUB_OFFLINE) or env


def resolve(name_or_path, revision=None, allow_patterns=None) -> Path:
    """A local directory or file as is; a repo id its snapshot directory, "repo:filename" that file
    in it. Downloaded: allow_patterns, by default hub_files of the repo's listing."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    repo, filename = split_repo_file(name_or_path)
    try:
        if allow_patterns is None and not offline():  # offline: the cached snapshot as it is
            names = HfApi().list_repo_files(repo, revision=revision)
            allow_patterns = hub_files(names, repo, filename)
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
            EntryNotFoundError, HFValidationError, OSError) as e:
        why = "not in the HF cache and HF_HUB_OFFLINE is set" if offline() else type(e).__name__
        what = f"{filename!r} in {repo!r}" if filename else repr(str(name_or_path))
        raise CheckpointError(f"cannot find {what}: no such local path, and as a Hub repo: "
                              f"{why}") from None
    if filename is not None and not (snapshot / filename).is_file():
        raise CheckpointError(f"{repo} (as cached) has no file {filename!r}")
    return snapshot if filename is None else snapshot / filename


def read_config(path: Path) -> dict | None:
    """config.json of a checkpoint directory, or None when it has none (BlinkDL .pth releases)."""
    f = (path if path.is_dir() else path.parent) / "config.json"
    return read_json(f) if f.exists() else None


def weight_files(path: Path) -> list[Path]:
    """The tensor files of a checkpoint, in the order of precedence safetensors > .bin > .pth."""
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():  # follow the weight_map, whatever the shards are called
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0]!r}, which is not in {path}")
        return [path / s for s in shards]
    for pattern in WEIGHT_ORDER:
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"no weights in {path} (looked for an index, {', '.join(WEIGHT_ORDER)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, in their stored dtypes, on the CPU (memory-mapped where the
    format allows)."""
    state = {}
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            part = load_safetensors(f)
        else:  # .bin / .pth: zip pickles; weights_only refuses code, mmap avoids a second copy
            part = load_pt(f, mmap=True)
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"tensor {sorted(dup)[0]!r} appears in more than one file of "
                                  f"{path}")
        state.update(part)
    return state


def check_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Size], where: str):
    """Raise one error naming the first missing, unexpected or mis-shaped tensor (and how many
    there are)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    for kind, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{where}: {kind} tensor {names[0]!r}{more}")
    if shaped:
        k = shaped[0]
        raise CheckpointError(f"{where}: tensor {k!r} has shape {list(got[k].shape)}, "
                              f"expected {list(expected[k])}")


class Tokenizer:
    """The one interface the project uses: encode(text) -> ids, decode(ids) -> text, vocab_size."""

    def __init__(self, tok, eos_id=None):
        self.tok, self.eos_id = tok, eos_id

    @classmethod
    def from_file(cls, file, eos_id=None):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            return cls(HFTokenizer.from_file(str(file)), eos_id)
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise CheckpointError(f"cannot read {file}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


class MissingTokenizer(Tokenizer):
    """Stands in when a checkpoint's tokenizer cannot be had: ids work everywhere, text fails
    with the reason."""

    def __init__(self, why, eos_id, vocab_size):
        super().__init__(None, eos_id)
        self.why, self.n = why, vocab_size

    def encode(self, text):
        raise CheckpointError(self.why)

    decode = encode

    @property
    def vocab_size(self):
        return self.n


def load_tokenizer(name_or_path, revision=None, eos_id=None,
                   filename="tokenizer.json") -> Tokenizer:
    """tokenizer.json from a checkpoint directory, a file, a Hub repo id or repo:FILENAME (cache /
    offline aware)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return Tokenizer.from_file(path, eos_id)
    if path.is_dir():
        if not (path / filename).exists():
            raise CheckpointError(f"no {filename} in {path}")
        return Tokenizer.from_file(path / filename, eos_id)
    from huggingface_hub import hf_hub_download
    repo, named = split_repo_file(str(name_or_path))  # repo:FILENAME names the file
    try:
        file = hf_hub_download(repo, named or filename, revision=revision)
        return Tokenizer.from_file(file, eos_id)
    except Exception as e:  # offline, missing repo, missing file: one line that says which
        raise CheckpointError(f"cannot get {filename} from {name_or_path!r} ({type(e).__name__}); "
                              f"pass a local tokenizer.json with --tokenizer") from None
