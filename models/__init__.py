"""load_model(name_or_path) -> (model, tokenizer): one entry point for every supported checkpoint.

Glossary
  arch          the loader's name of an architecture: "qwen35" | "mamba2" | "rwkv7" (ARCHS),
                also the model module's name and the model class's `arch`
  demo model    a small pretrained model committed with the project (see below)

Dispatch is on the checkpoint's config.json (or its absence):
  model_type qwen3_5 / qwen3_5_text          -> models.qwen35   (Qwen3.5 Gated DeltaNet hybrid)
  model_type mamba2, or a raw mamba_ssm config -> models.mamba2   (d_model / n_layer / ssm_cfg,
                                                                   no model_type)
  model_type rwkv7, or no config and a .pth   -> models.rwkv7    (fla safetensors / BlinkDL
                                                                   state dict)
"demo/gdn", "demo/mamba2", "demo/rwkv7" name the small pretrained models committed with the
project in demo/<name> (built by demo/build.py).
"""

import importlib
from pathlib import Path

import torch

from . import hub
# the public API
from .common import Capture, Cache, Edit, Output, WriteModel, rebuild_states  # noqa: F401

__all__ = ["load_model", "detect_arch", "demo_path", "Capture", "Cache", "Edit", "Output",
           "WriteModel", "rebuild_states"]

ARCHS = {"qwen35": "Qwen3.5 (Gated DeltaNet)", "mamba2": "Mamba-2", "rwkv7": "RWKV-7"}
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"   # the committed demo checkpoints
DEMO_MODELS = ("gdn", "mamba2", "rwkv7")


def detect_arch(config: dict | None) -> str:
    if config is None:
        return "rwkv7"  # BlinkDL releases ship a bare .pth state dict
    mt = config.get("model_type") or config.get("text_config", {}).get("model_type")
    if mt in ("qwen3_5", "qwen3_5_text"):
        return "qwen35"
    if mt == "mamba2" or (mt is None and "d_model" in config and "ssm_cfg" in config):
        return "mamba2"
    if mt == "rwkv7":
        return "rwkv7"
    raise hub.CheckpointError(f"unsupported model_type {mt!r}: this project reads "
                              f"{', '.join(ARCHS.values())} checkpoints")


def demo_path(name) -> Path:
    """'demo/gdn' | 'demo/mamba2' | 'demo/rwkv7' -> the committed checkpoint directory."""
    short = str(name).removeprefix("demo/")
    if not str(name).startswith("demo/") or short not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; demo models: "
                         f"{', '.join('demo/' + m for m in DEMO_MODELS)}")
    path = DEMO_DIR / short
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"demo model {name} is not built: {path} has no config.json "
                                f"(python -m demo.build pretrain --arch {short})")
    return path


def load_model(name_or_path, device="cpu", dtype=torch.float32, revision=None, tokenizer=None):
    """A Hub repo id, repo:FILENAME (one weight file of a repo), a local directory or file ->
    (model in eval mode, tokenizer). tokenizer= overrides the tokenizer source (a tokenizer.json, a
    World vocabulary .txt, a directory, a repo id, repo:FILENAME); revision= pins the snapshot."""
    if str(name_or_path).startswith("demo/"):
        path = demo_path(name_or_path)
    else:
        path = hub.resolve(name_or_path, revision=revision)
    arch = detect_arch(hub.read_config(path))
    module = importlib.import_module(f"{__name__}.{arch}")
    model, tok = module.from_pretrained(path, device=device, dtype=dtype, tokenizer=tokenizer)
    return model.eval(), tok
