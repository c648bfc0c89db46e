"""Test set-up: run Triton kernels under the CPU interpreter unless told otherwise.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, at the
top of the first file pytest loads. On a GPU machine run with ``TRITON_INTERPRET=0`` to
test the compiled kernels on CUDA (benchmarks/gpu_check.sh does).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# The tuner's picks persist on disk (kernels/tuning_cache.py): tests that stub its timer
# must never write into the user's cache, so the session gets a fresh one.
import tempfile  # noqa: E402

os.environ["FASTPEFT_CACHE"] = tempfile.mkdtemp(prefix="fastpeft-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETED = os.environ["TRITON_INTERPRET"] not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"

# The interpreter multiplies raw bf16 bits in tl.dot, so bf16 runs on a real GPU only.
KERNEL_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot needs a CUDA GPU (interpreter limit)"),
    ),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_tiles_only(monkeypatch):
    """On a GPU the tuner may prefer the library-GEMM variant of LoRA, (IA)^3 and
    bottleneck for tiny shapes; tests about the Triton kernel tune over its tiles only, from an
    empty tuner cache (the library variant has its own tests). Under the interpreter the
    Triton kernel always runs anyway."""
    from fastpeft.kernels import autotune, bottleneck, ia3, lora

    monkeypatch.setattr(ia3, "tiles_and_library", autotune.gemm_candidates)
    monkeypatch.setattr(bottleneck, "tiles_and_library", autotune.gemm_candidates)
    monkeypatch.setattr(lora, "lora_variants", autotune.lora_candidates)
    monkeypatch.setattr(autotune, "TUNED", {})


@pytest.fixture
def launches(monkeypatch):
    """Input shapes of the mixed-adapter kernel's launches (it runs inside the custom op):
    a test proves the fused kernel ran, not the reference."""
    from fastpeft.methods.lora import multi_op as ops_multi  # after TRITON_INTERPRET is set above

    calls = []
    real = ops_multi._kernels.multi_lora_linear_fwd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops_multi._kernels, "multi_lora_linear_fwd", spy)
    return calls
