"""Kernel tests run on the GPU when one is visible (Triton compiles them for it), else on the CPU
under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 there). Inputs are drawn on
the CPU from seeded generators, then moved to DEV, so both draw the same numbers."""

import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
