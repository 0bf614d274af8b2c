"""models/hub.py and the Qwen3.5 loader on every real on-disk layout: the Hub's multimodal wrapper (sharded index
with its odd shard names, model.language_model. prefix, model.visual.* and mtp.* extras, bf16 with an fp32 A_log,
tied head), transformers' text-only save_pretrained, a .bin, a repo id resolved from the HF cache offline, and
every loader error."""

import hashlib
import json
import os

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file, save_file
from test_qwen35 import ids_for, tf_model

import models
from models import hub, qwen35


def bf16_rounded(ref):
    """The transformers model with the weights a bf16 checkpoint holds (A_log stays fp32, as on the Hub)."""
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if not n.endswith("A_log"):
                p.copy_(p.bfloat16().float())
    return ref


def write_multimodal(ref, path, shards=2):
    """The layout of Qwen/Qwen3.5-0.8B: Qwen3_5ForConditionalGeneration config, text weights under
    model.language_model., vision and MTP tensors beside them, bf16 with fp32 A_log, no lm_head (tied),
    shards named model.safetensors-0000i-of-0000n.safetensors behind model.safetensors.index.json."""
    text = ref.config.to_dict()
    text.update(model_type="qwen3_5_text", mtp_num_hidden_layers=1, mamba_ssm_dtype="float32", attn_output_gate=True,
                rope_parameters={**text["rope_parameters"], "mrope_interleaved": True, "mrope_section": [1, 1, 0]})
    text.pop("architectures", None)
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
              "tie_word_embeddings": True, "image_token_id": 90, "vision_config": {"depth": 1, "hidden_size": 8}}
    (path / "config.json").write_text(json.dumps(config))
    tensors = {n.replace("model.", "model.language_model.", 1): t.to(torch.float32 if n.endswith("A_log") else torch.bfloat16)
               for n, t in ref.state_dict().items() if n != "lm_head.weight"}
    D = ref.config.hidden_size
    tensors.update({"model.visual.patch_embed.proj.weight": torch.randn(8, 3, 2, 4, 4).bfloat16(),
                    "model.visual.blocks.0.attn.qkv.weight": torch.randn(24, 8).bfloat16(),
                    "mtp.fc.weight": torch.randn(D, 2 * D).bfloat16(), "mtp.norm.weight": torch.randn(D).bfloat16(),
                    "mtp.layers.0.mlp.up_proj.weight": torch.randn(48, D).bfloat16()})
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model.safetensors-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    vocab = {"<unk>": 0, "<|endoftext|>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def ref():
    return bf16_rounded(tf_model("tied-Hv=Hk", seed=3))


@pytest.fixture(scope="module")
def multimodal(ref, tmp_path_factory):
    return write_multimodal(ref, tmp_path_factory.mktemp("qwen35-mm"))


@torch.no_grad()
def test_multimodal_sharded_bf16_checkpoint(ref, multimodal):
    assert {f.name for f in multimodal.glob("*.safetensors")} == {
        "model.safetensors-00001-of-00002.safetensors", "model.safetensors-00002-of-00002.safetensors"}
    model, tok = models.load_model(multimodal)
    ids = ids_for(model)
    want = ref(ids).logits
    got = model(ids).logits
    assert_close("logits", want, got, 1e-5)
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.eos_token_id == 3
    stored = load_file(str(multimodal / "model.safetensors-00001-of-00002.safetensors")) | \
        load_file(str(multimodal / "model.safetensors-00002-of-00002.safetensors"))
    a_log = stored["model.language_model.layers.0.linear_attn.A_log"]
    assert a_log.dtype == torch.float32 and torch.equal(model.model.layers[0].linear_attn.A_log, a_log)
    # no tokenizer.json: ids work, text fails with a line that says what to do
    with pytest.raises(hub.CheckpointError, match="no tokenizer.json in .*pass tokenizer="):
        tok.encode("hello")
    assert tok.vocab_size == ref.config.vocab_size and tok.eos_id == 3
    bf16, _ = models.load_model(multimodal, dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16 and bf16.model.layers[0].linear_attn.A_log.dtype == torch.float32
    assert_close("bf16 logits", want, bf16(ids).logits, 3e-2)


@torch.no_grad()
def test_tied_head_present_on_disk_is_tolerated_and_untied_head_is_required(ref, tmp_path):
    sd = {n: t.clone() for n, t in ref.state_dict().items()}  # lm_head.weight saved although tied
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model, _ = models.load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = {**ref.config.to_dict(), "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd.pop("lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(hub.CheckpointError, match="missing tensor 'lm_head.weight'"):
        models.load_model(tmp_path)


@torch.no_grad()
def test_pytorch_bin_checkpoint(ref, tmp_path):
    torch.save(dict(ref.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    model, _ = models.load_model(tmp_path)
    ids = ids_for(model, T=10)
    assert_close("logits", ref(ids).logits, model(ids).logits)


def populate_hf_cache(cache, repo_id, files: dict, sha="0123456789abcdef0123456789abcdef01234567"):
    """The cache layout huggingface_hub writes: blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>,
    refs/main = <sha>."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    return sha


@torch.no_grad()
def test_load_by_repo_id_from_the_hf_cache_offline(ref, multimodal, tmp_path, monkeypatch):
    from huggingface_hub import constants
    write_tokenizer(multimodal, ref.config.vocab_size)
    cache = tmp_path / "hf" / "hub"
    files = {f.name: f for f in multimodal.iterdir()}
    sha = populate_hf_cache(cache, "tiny-org/Qwen3.5-tiny", files)
    (multimodal / "tokenizer.json").unlink()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import: patch the live value too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, tok = models.load_model("tiny-org/Qwen3.5-tiny")
    ids = ids_for(model, T=12)
    assert_close("logits", ref(ids).logits, model(ids).logits)
    assert tok.encode("w5 w7 w40") == [5, 7, 40] and tok.decode([5, 7]) == "w5 w7" and tok.eos_id == 3
    again, _ = models.load_model("tiny-org/Qwen3.5-tiny", revision=sha)
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert hub.load_tokenizer("tiny-org/Qwen3.5-tiny").encode("w9") == [9]
    with pytest.raises(hub.CheckpointError, match="cannot find 'tiny-org/absent'.*HF_HUB_OFFLINE is set"):
        models.load_model("tiny-org/absent")
    with pytest.raises(hub.CheckpointError, match="cannot get tokenizer.json from 'tiny-org/absent'"):
        hub.load_tokenizer("tiny-org/absent")


def test_tensor_errors_name_the_tensor(ref, multimodal, tmp_path):
    sd = {n: t.contiguous() for n, t in ref.state_dict().items() if n != "lm_head.weight"}
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))

    def load_with(tensors):
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return models.load_model(tmp_path)

    name = "model.layers.0.linear_attn.A_log"
    with pytest.raises(hub.CheckpointError, match=f"missing tensor '{name}'"):
        load_with({n: t for n, t in sd.items() if n != name})
    with pytest.raises(hub.CheckpointError, match="unexpected tensor 'model.layers.0.linear_attn.bias'"):
        load_with({**sd, "model.layers.0.linear_attn.bias": torch.zeros(3)})
    with pytest.raises(hub.CheckpointError, match=rf"tensor '{name}' has shape \[3\], expected \[2\]"):
        load_with({**sd, name: torch.zeros(3)})
    with pytest.raises(hub.CheckpointError, match="unexpected tensor 'model.layers.1.linear_attn.A_log'"):
        # a layer_types that disagrees with the weights: layer 1 is attention in the config
        load_with({**sd, "model.layers.1.linear_attn.A_log": torch.zeros(2)})
    # a shard the index names but the directory lacks; one tensor in two files
    index = json.loads((multimodal / "model.safetensors.index.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((multimodal / "config.json").read_text())
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hub.CheckpointError, match="names shard 'model.safetensors-00001-of-00002.safetensors', which is not in"):
        models.load_model(broken)
    for f in multimodal.glob("*-of-*.safetensors"):
        (broken / f.name).write_bytes(f.read_bytes())
    save_file({name.replace("model.", "model.language_model.", 1): torch.zeros(2), "x": torch.zeros(1)},
              str(broken / "model.safetensors-00003-of-00003.safetensors"))
    index["weight_map"]["x"] = "model.safetensors-00003-of-00003.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hub.CheckpointError, match="'model.language_model.layers.0.linear_attn.A_log' appears in more than one file"):
        models.load_model(broken)


def test_config_and_file_errors(ref, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(hub.CheckpointError, match="no config.json in"):
        qwen35.from_pretrained(empty)
    (empty / "config.json").write_text(json.dumps(ref.config.to_dict()))
    with pytest.raises(hub.CheckpointError, match="no weights in"):
        models.load_model(empty)
    with pytest.raises(hub.CheckpointError, match="no tokenizer.json in"):
        hub.load_tokenizer(empty)
    with pytest.raises(hub.CheckpointError, match="unknown layer type 'sliding_attention'"):
        qwen35.Qwen35Config.from_hf({**ref.config.to_dict(), "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(hub.CheckpointError, match="unsupported model_type 'llama'"):
        models.detect_arch({"model_type": "llama"})


def test_config_from_the_real_multimodal_file():
    """The verbatim text_config of Qwen/Qwen3.5-0.8B, and the older flat-rope spelling."""
    text = {"attention_bias": False, "attn_output_gate": True, "dtype": "bfloat16", "eos_token_id": 248044,
            "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": 1024,
            "intermediate_size": 3584, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
            "linear_num_value_heads": 16, "linear_value_head_dim": 128, "model_type": "qwen3_5_text",
            "num_attention_heads": 8, "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "vocab_size": 248320, "mamba_ssm_dtype": "float32",
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                                "rope_theta": 10000000, "partial_rotary_factor": 0.25}}
    cfg = qwen35.Qwen35Config.from_hf({"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                                       "text_config": text, "tie_word_embeddings": True})
    assert cfg == qwen35.Qwen35Config(eos_token_id=248044)
    flat = {k: v for k, v in text.items() if k != "rope_parameters"}
    cfg = qwen35.Qwen35Config.from_hf({**flat, "rope_theta": 5e6, "partial_rotary_factor": 0.5})
    assert cfg.rope_theta == 5e6 and cfg.partial_rotary_factor == 0.5 and cfg.layer_types[3] == "full_attention"
