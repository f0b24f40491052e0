"""Kernel tests: without CUDA the Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set before the kernel
modules are first imported; this conftest is loaded before the test modules of this folder.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in (
        "openlora_kernels.triton_ops.sgmv_shrink",
        "openlora_kernels.triton_ops.sgmv_expand",
        "openlora_kernels.triton_ops.paged_decode",
        "openlora_kernels.triton_ops.int8_matmul",
    ):
        if name in sys.modules:
            raise pytest.UsageError(f"{name} was imported before TRITON_INTERPRET=1 could be set")
