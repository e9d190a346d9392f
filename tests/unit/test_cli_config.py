"""Each role's config is built once from its flags: the flags' defaults are the dataclasses'
defaults, values a user can get wrong fail with the flag and the number in one line, and the front
roles read the model's tokenizer and limits without its weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.engine_args import engine_config_from_args
from pagoda.engine.loader import load_checkpoint
from pagoda.engine.loader.model_info import read_model_info
from pagoda.services.cli.config import (
    ROLES,
    ClusterConfig,
    GatewayConfig,
    ModelSource,
    WorkerConfig,
    launch_config,
)
from pagoda.services.cli.main import main
from pagoda.services.cli.parser import build_parser
from pagoda.services.cli.served_model import read_served_model
from pagoda.services.scheduler.admission import AdmissionLimits
from tests.tiny_models import make_tiny_model

CLUSTER = ["--bus", "amqp://x", "--store", "redis://x"]


@pytest.fixture(autouse=True)
def _no_api_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAGODA_API_KEYS", raising=False)
    monkeypatch.delenv("PAGODA_API_KEY", raising=False)


def test_flag_defaults_are_the_dataclass_defaults() -> None:
    """With no flags, every role's config equals the one its dataclasses build by default."""
    config = launch_config(build_parser().parse_args(["serve"]), ROLES)
    assert config.cluster == ClusterConfig()
    assert config.gateway == GatewayConfig()
    assert config.admission == AdmissionLimits()
    assert config.worker == WorkerConfig(engine=EngineConfig())
    assert config.model == ModelSource("", None, None)
    for role in ROLES:
        alone = launch_config(build_parser().parse_args([role, *CLUSTER]), (role,))
        assert alone.cluster == ClusterConfig(bus="amqp://x", store="redis://x")
        assert alone.admission == AdmissionLimits()
    worker = launch_config(build_parser().parse_args(["worker", *CLUSTER]), ("worker",)).worker
    assert worker == WorkerConfig(engine=EngineConfig())


def test_flags_reach_the_configs() -> None:
    args = build_parser().parse_args(
        "serve --port 9001 --namespace ns --heartbeat-interval 0.5 --queue-timeout 0 --max-num-seqs 7 "
        "--kv-cache-memory 2GiB --no-enable-prefix-caching --served-model-name m --max-model-len 512".split()
    )
    config = launch_config(args, ROLES)
    assert config.gateway is not None and config.gateway.port == 9001 and config.gateway.queue_timeout_s == 0
    assert config.cluster.namespace == "ns" and config.cluster.heartbeat_s == 0.5
    assert config.model == ModelSource("", "m", 512)
    engine = engine_config_from_args(args)
    assert engine.batcher.max_num_seqs == 7 and engine.cache.kv_cache_memory == 2 * 2**30
    assert not engine.cache.enable_prefix_caching


def test_model_is_repeatable_for_the_roles_that_serve_several() -> None:
    """`--model` and `--served-model-name` pair up in order; the first model is what one engine
    reads (`config.model`, and the engine flags' `--model`)."""
    args = build_parser().parse_args(
        ["serve", "--model", "a", "--served-model-name", "x", "--model", "b", "--served-model-name", "y"]
    )
    config = launch_config(args, ROLES)
    assert config.models == (ModelSource("a", "x", None), ModelSource("b", "y", None))
    assert config.model == config.models[0] and engine_config_from_args(args).model == "a"
    two = launch_config(
        build_parser().parse_args(["gateway", *CLUSTER, "--model", "a", "--model", "b"]), ("gateway",)
    )
    assert two.models == (ModelSource("a", None, None), ModelSource("b", None, None))


def test_the_sim_backend_fills_in_its_own_defaults() -> None:
    from pagoda.engine.core.sim_core import SimConfig

    args = build_parser().parse_args(
        ["worker", *CLUSTER, "--backend", "sim", "--sim-step-ms", "5", "--seed", "3"]
    )
    worker = launch_config(args, ("worker",)).worker
    assert worker is not None and worker.sim == SimConfig(step_ms=5.0, seed=3)
    torch_worker = launch_config(build_parser().parse_args(["worker", *CLUSTER]), ("worker",)).worker
    assert torch_worker is not None and torch_worker.sim is None


BAD_VALUES = {  # command line (a role alone gets CLUSTER too) -> what the error says
    "scheduler --shutdown-timeout -1": "--shutdown-timeout must be >= 0 seconds, got -1.0",
    "scheduler --heartbeat-interval 0": "--heartbeat-interval must be > 0 seconds, got 0.0",
    "scheduler --metrics-port 70000": "--metrics-port must be a TCP port (1-65535), got 70000",
    "worker --stall-timeout 0": "--stall-timeout must be > 0 seconds, got 0.0",
    "worker --threads -1": "--threads must be >= 0 (0: auto), got -1",
    "serve --port -2": "--port must be a TCP port (0-65535), got -2",
    "serve --queue-timeout -1": "--queue-timeout must be >= 0 seconds (0: no limit), got -1.0",
    "serve --priority-reserve -3": "--priority-reserve must be >= 0, got -3",
    "serve --max-model-len 0": "max_model_len must be at least 1, got 0",
    "scheduler --bus memory://": "`pagoda scheduler` runs alone: give it --bus amqp://... and --store redis://...",
    "worker --model a --model b": "a worker serves one model (--model given 2 times): run one",
    "serve --model a --model b --served-model-name x": "--served-model-name was given 1 times for 2 --model",
    "serve --served-model-name x --served-model-name y": "--served-model-name was given 2 times for 1",
    "gateway --model a --model a": "--model names the same model twice (a, a)",
}


@pytest.mark.parametrize(("command", "message"), BAD_VALUES.items())
def test_bad_values_name_the_flag_and_the_number(
    command: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config is checked before anything connects: one line, exit status 2."""
    role, *flags = command.split()
    argv = [role, *flags] if role == "serve" else [role, *CLUSTER, *flags]
    with pytest.raises(ValueError) as err:
        launch_config(build_parser().parse_args(argv), ROLES if role == "serve" else (role,))
    assert message in str(err.value)
    assert main(argv) == 2
    assert f"pagoda: error: {message}" in capsys.readouterr().err


def test_front_roles_read_the_model_without_its_weights() -> None:
    served = read_served_model(ModelSource("", "chat", None))
    assert served.name == "chat" and served.max_model_len == 8192  # the demo GGUF's context
    assert served.default_sampling == {"temperature": 0.2, "top_p": 0.9}
    assert served.tokenizer.decode(served.tokenizer.encode("hello world")) == "hello world"
    with pytest.raises(
        ValueError, match="max_model_len 9000 exceeds the model's maximum context length 8192"
    ):
        read_served_model(ModelSource("", None, 9000))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_model_info_agrees_with_the_checkpoint(kind: str, tmp_path: Path, demo_gguf: str) -> None:
    """What the front roles read equals what the worker's loader reads, for GGUF and HF dirs."""
    make_tiny_model(kind, tmp_path)
    for source in (str(tmp_path), demo_gguf):
        info, ckpt = read_model_info(source), load_checkpoint(source)
        assert info.name == ckpt.name and info.path == ckpt.path
        assert info.context_length == ckpt.arch.max_position_embeddings
        assert info.tokenizer.encode("a b c") == ckpt.tokenizer.encode("a b c")
