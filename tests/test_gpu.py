"""CUDA checks for all three architectures (`pytest -m gpu`; skipped without a device, see
conftest.py): fp32 logits on CUDA against the CPU, prefill + decode on CUDA, a bf16 forward without
NaN, and the chunked scans against the token loop on CUDA. TF32 is off (conftest.py), so fp32 on
CUDA is compared at fp32 tolerances."""

import pytest
import torch
from helpers import assert_close
from test_mamba2 import scan_inputs as mamba2_inputs
from test_qwen35 import rand_inputs as gdn_inputs
from test_rwkv7 import scan_inputs as rwkv7_inputs
from test_train import TINY, tiny_model

from models import mamba2, qwen35, rwkv7

pytestmark = pytest.mark.gpu
T = 150  # crosses the chunk boundaries of every scan (32 / 64)


def ids(B=2, seed=0):
    vocab = TINY["rwkv7"][2]["vocab_size"]  # all three tiny models share it
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def forward_checks(arch, device):
    """(CPU fp32 logits, device fp32 logits, device prefill + decode, device bf16 logits)."""
    _, model = tiny_model(arch)
    x = ids()
    with torch.no_grad():
        cpu = model(x).logits
        model = model.to(device)
        full = model(x.to(device)).logits
        prefill = model(x[:, :-5].to(device), use_cache=True)
        cache, steps = prefill.cache, [prefill.logits]
        for t in range(T - 5, T):
            out = model(x[:, t:t + 1].to(device), cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        bf16 = model.to(torch.bfloat16)(x.to(device)).logits
    return cpu, full.cpu(), torch.cat(steps, 1).cpu(), bf16.float().cpu()


@pytest.mark.parametrize("arch", list(TINY))
def test_cuda_forward_matches_cpu_and_bf16_is_finite(arch):
    cpu, full, decoded, bf16 = forward_checks(arch, "cuda")
    assert_close(f"{arch} cuda fp32 logits", cpu, full, 1e-4)
    assert_close(f"{arch} cuda prefill + decode", full, decoded, 1e-4)
    assert bf16.isfinite().all(), f"{arch}: bf16 logits hold NaN or inf"
    assert_close(f"{arch} bf16 logits", cpu, bf16, 5e-2)


def scans(device):
    """(name, recurrent(...), chunked(...)) for each architecture's scan on device, in fp32."""
    to = lambda d: {n: v.to(device) for n, v in d.items()}  # noqa: E731
    g = to(gdn_inputs(2, 300, 2, 16, 16))
    m, kw, S0 = mamba2_inputs(300)
    m, kw, S0 = to(m), to(kw), S0.to(device)
    r = to(rwkv7_inputs(2, 300, 2, 32))
    return [("gdn", qwen35.recurrent(g), qwen35.chunked(g)),
            ("mamba2", mamba2.recurrent(m, S0, **kw), mamba2.chunked(m, S0, **kw)),
            ("rwkv7", rwkv7.recurrent(r), rwkv7.chunked(r))]


@torch.no_grad()
def test_cuda_chunked_scans_equal_the_token_loop():
    for name, (o1, S1, w1), (o2, S2, w2) in scans("cuda"):
        assert o2.is_cuda and S2.is_cuda
        assert_close(f"{name} out", o1, o2, 1e-4)
        assert_close(f"{name} final state", S1, S2, 1e-4)
        for k in w1:
            assert_close(f"{name} write {k}", w1[k], w2[k], 1e-4)
