"""The CUDA kernels under Numba's simulator: run as a separate pytest process with
NUMBA_ENABLE_CUDASIM=1 (set before numba is imported), as `make test` does."""

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.exit("tests/cudasim needs NUMBA_ENABLE_CUDASIM=1 in the environment (see the Makefile)", returncode=4)
