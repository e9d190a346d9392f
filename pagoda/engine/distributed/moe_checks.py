"""What the mixture-of-experts parallel layouts need of sizes and models (expert_parallel.py,
data_parallel.py): checked where the config is built, before any rank starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.engine.models.arch_config import ModelArchConfig


def check_parallel_sizes(dp: int, expert_parallel: bool) -> None:
    """Raise ValueError, naming the flag, for sizes no engine runs (ParallelConfig's check)."""
    if dp < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {dp}")
    if dp > 1 and not expert_parallel:
        raise ValueError(
            f"--data-parallel-size {dp} runs mixture-of-experts models with their experts split "
            "across the ranks: add --enable-expert-parallel (for a dense model, run more workers)"
        )


def check_expert_split(cfg: ModelArchConfig, dp: int, tp: int) -> None:
    """Raise ValueError, naming the flags, when `cfg`'s experts cannot split over the dp x tp ranks
    of data-parallel engines (data_parallel_group.py); a dense model's engines never meet."""
    from pagoda.engine.models.arch_config import MOE_ARCHITECTURES

    ranks = dp * tp
    if cfg.architecture in MOE_ARCHITECTURES and cfg.num_experts % ranks:
        sizes = f"--data-parallel-size {dp}" + (f" x --tensor-parallel-size {tp}" if tp > 1 else "")
        raise ValueError(
            f"{sizes} splits the experts over {ranks} ranks; the model's {cfg.num_experts} experts "
            f"must divide evenly: pick sizes whose product divides {cfg.num_experts}"
        )


def check_moe_split(cfg: ModelArchConfig, size: int, expert_parallel: bool, flag: str) -> None:
    """Raise ValueError, naming the flag, when `cfg`'s MoE layers cannot split over `size` ranks."""
    what = f"{flag} and the mixture-of-experts model's"
    if expert_parallel:
        if cfg.num_experts % size:
            raise ValueError(
                f"{what} {cfg.num_experts} experts: --enable-expert-parallel needs the experts to "
                f"divide evenly; pick a divisor of {cfg.num_experts}"
            )
    elif cfg.moe_intermediate_size % size:
        raise ValueError(
            f"{what} expert intermediate size {cfg.moe_intermediate_size}: pick a divisor of it, "
            "or split whole experts with --enable-expert-parallel"
        )
    shared = cfg.shared_expert_intermediate_size
    if shared % size:
        raise ValueError(f"{what} shared expert of {shared} units: pick a divisor of {shared}")
