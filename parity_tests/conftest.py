"""pytest options and fixtures shared by every parity test.

    pytest parity_tests                              # CPU, float32, tight tolerances
    pytest parity_tests --device cuda --dtype fp16   # GPU tier, judged by the error budget
    pytest parity_tests --device cuda --dtype fp16 --fast   # the same, pare on its fast path (pare/fast/)
    TRITON_INTERPRET=1 pytest parity_tests -m kernel        # the Triton kernels on the CPU, under Triton's interpreter
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from pare.parity import DTYPES

# Deterministic by default (CI and local runs see the same examples); HYPOTHESIS_PROFILE=dev explores more.
_common = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=8, **_common)
settings.register_profile("dev", max_examples=50, **{**_common, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="where both libraries run")
    parser.addoption("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision both libraries run in")
    parser.addoption("--fast", action="store_true",
                     help="pare's models run its fast path (pare/fast/) in every block check, at the same tolerances")


def pytest_configure(config):
    from parity_tests import harness

    harness.FAST = config.getoption("--fast")
    # Parity in float32 means IEEE float32: TF32 matmuls would add ~1e-3 error to both sides.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    device = config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="--device cuda was asked for, but torch sees no CUDA device")
        for item in items:
            item.add_marker(skip)
        return
    if device == "cpu":
        from pare.fast.kernels import INTERPRET

        skip_cuda = pytest.mark.skip(reason="needs a CUDA device: run with --device cuda")
        skip_official = pytest.mark.skip(reason="official SD configs are the GPU tier: run with --device cuda")
        skip_kernel = pytest.mark.skip(reason="a Triton kernel: run with --device cuda, or on the CPU under Triton's "
                                              "interpreter (TRITON_INTERPRET=1, Triton installed)")
        for item in items:
            if "official" in item.keywords:
                item.add_marker(skip_official)
            elif "cuda" in item.keywords:
                item.add_marker(skip_cuda)
            elif "kernel" in item.keywords and not INTERPRET:
                item.add_marker(skip_kernel)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    return DTYPES[request.config.getoption("--dtype")]


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, as the torchrun ranks it is compared with run (OMP_NUM_THREADS=1):
    a CPU kernel's sums, and so its rounding, depend on the number of threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
