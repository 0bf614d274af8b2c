"""Shared test utilities: tolerances in one place, and the GPU-kernel blocker for CPU oracles."""

import sys


def rel_err(ref, got) -> float:
    """RMS-relative error ‖got − ref‖ / ‖ref‖ (fla's get_err_ratio)."""
    ref, got = ref.double(), got.double()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name, ref, got, ratio=1e-5):
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = rel_err(ref, got)
    max_abs = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= ratio, f"{name}: rms-rel err {err:.3g} > {ratio:.1g} (max abs {max_abs:.3g})"


def block_gpu_kernels():
    """fla / mamba_ssm / causal_conv1d / triton import fine but crash on a CPU: make them unimportable
    before transformers binds them, so transformers takes its pure-torch paths."""
    for name in ("fla", "mamba_ssm", "causal_conv1d", "triton"):
        sys.modules[name] = None
