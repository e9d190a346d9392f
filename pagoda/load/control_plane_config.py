"""The settings of `pagoda bench control-plane` (see bench_control_plane.py), apart from the
benchmark so that the `pagoda` parser reads their defaults without importing it."""

from __future__ import annotations

from dataclasses import dataclass

SATURATED_PCT = 90.0  # CPU% of one core at which a single-threaded service counts as saturated


@dataclass(frozen=True)
class ControlPlaneConfig:
    bus: str = "amqp://guest:guest@127.0.0.1:5672/"
    store: str = "redis://127.0.0.1:6379/0"
    namespace: str = ""  # "": a fresh one per run
    model: str = ""  # whose tokenizer the services use ("": the demo model)
    workers: int = 4
    tokenizers: int = 1
    gateways: int = 1  # gateway processes sharing the port (--reuse-port)
    streams: tuple[int, ...] = (100,)
    duration_s: float = 10.0  # per level; streams then finish the request they are in
    output_len: int = 64
    prompt_words: int = 32
    step_ms: float = 20.0
    max_batch: int = 256
    router: str = "prefix"
    service_log_level: str = "WARNING"
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 120.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1 or self.tokenizers < 1 or self.gateways < 1:
            raise ValueError("--workers, --tokenizers and --gateways must be at least 1")
        if not self.streams or min(self.streams) < 1:
            raise ValueError(f"--streams {self.streams}: give positive counts, e.g. 100,500,1000")
        if self.duration_s <= 0 or self.output_len < 2:
            raise ValueError("--duration must be positive and --output-len at least 2")
