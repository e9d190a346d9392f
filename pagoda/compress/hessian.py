"""The layer Hessian GPTQ and SparseGPT minimize against, H = 2/n X^T X over calibration inputs
X [n, in] (the Hessian of ||X W^T - X Ŵ^T||^2 / n in each output row), and the upper Cholesky
factor of its damped inverse that both algorithms sweep with."""

from __future__ import annotations

import torch

MAX_DAMP_RETRIES = 6  # damp x10 each retry: 0.01 -> 1e4 times the mean diagonal at most


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` [..., in] as [n, in] rows."""
    return x.reshape(-1, x.shape[-1])


def hessian_from(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2/n X^T X [in, in] in `dtype` (float32 or float64) from inputs `x` [..., in]."""
    rows = _rows(x).to(dtype)
    return rows.t() @ rows * (2.0 / rows.shape[0])


class HessianAccumulator:
    """Streams calibration batches into one Hessian without keeping them: the sum of X^T X and the
    row count, divided once at the end (exact in the accumulation dtype, unlike the reference's
    running rescale by n / (n + m) per batch)."""

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        self.sum = torch.zeros(in_features, in_features, device=device, dtype=dtype)  # [in, in]
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs `x` [..., in] (any float dtype, any leading shape)."""
        rows = _rows(x).to(device=self.sum.device, dtype=self.sum.dtype)
        if rows.shape[1] != self.sum.shape[0]:
            raise ValueError(f"inputs have {rows.shape[1]} features, the Hessian {self.sum.shape[0]}")
        self.sum.addmm_(rows.t(), rows)
        self.count += int(rows.shape[0])

    def hessian(self) -> torch.Tensor:
        """2/n X^T X over every row added so far [in, in]."""
        if self.count == 0:
            raise ValueError("no calibration inputs were added to this Hessian")
        return self.sum * (2.0 / self.count)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """[in] bool: inputs no calibration token ever activated (zero diagonal). Their weights can
    be anything without changing the calibration outputs; GPTQ zeroes them."""
    return torch.diag(hessian) == 0


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 [in, in] float32, with dead
    inputs' diagonal set to 1 first (as the reference does). Row i of U, from column i on, is the
    error feedback of quantizing input i onto the inputs after it; U[i, i]^2 is the inverse
    Hessian diagonal entry OBS divides by. Computed in float64: the factorization of a
    near-singular H (few calibration tokens, correlated inputs) loses the last digits in float32.
    When H + damp is still not positive definite, damp grows 10x at a time."""
    h = hessian.to(torch.float64).clone()
    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(MAX_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(h + eye * (damp * 10.0**attempt * mean_diag))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inverse, upper=True).float()
    raise ValueError(
        f"the Hessian is not positive definite even with damping {damp * 10.0 ** (MAX_DAMP_RETRIES - 1)}"
        " x its mean diagonal; calibrate on more tokens"
    )
