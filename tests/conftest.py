import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("RWKV_V7_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")
os.environ.setdefault("RWKV_JIT_ON", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))
# fp32 parity tests compare to ~1e-5: TF32 (1e-3) stays off on CUDA whatever torch's defaults are
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

from helpers import block_gpu_kernels  # noqa: E402

block_gpu_kernels()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
