"""vLLM's runtime LoRA endpoints (with --enable-lora): `POST /v1/load_lora_adapter` registers a PEFT
adapter directory under a name clients then put in `model`; `POST /v1/unload_lora_adapter` removes
it (requests already running with it finish with it). Both answer plain text, as vLLM does; the
adapter is checked here (its config and rank), so a bad one is a 400 before any request uses it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from pagoda.engine import read_adapter_config
from pagoda.services.gateway.adapters import Adapter, AdapterDirectory
from pagoda.services.transport.errors import APIError, bad_request

if TYPE_CHECKING:
    from pagoda.services.gateway.server import ServedModels


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    base_model_name: str | None = None  # pagoda's: which served model it adapts (default: the first)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored (names identify adapters)


def register_adapter_routes(app: FastAPI, models: ServedModels, adapters: AdapterDirectory) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> PlainTextResponse:
        adapter = await checked_adapter(req, models, adapters)
        await adapters.register(adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        if not await adapters.remove(req.lora_name):
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


async def checked_adapter(
    req: LoadLoRAAdapterRequest, models: ServedModels, adapters: AdapterDirectory
) -> Adapter:
    """The adapter `req` asks for, or a 400 naming what is wrong with it."""
    name = req.lora_name
    if not name or not name.isprintable():
        raise bad_request("lora_name must be a non-empty name of printable characters.", "lora_name")
    await adapters.refresh()  # another gateway may have registered it
    if adapters.get(name) is not None:
        raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
    base = models.default if req.base_model_name is None else models.pick(req.base_model_name)
    if name in base.served_model_names or any(name in s.served_model_names for s in models.servers):
        raise bad_request(f"'{name}' is the name of a served model; choose another lora_name.", "lora_name")
    if req.base_model_name is not None and req.base_model_name not in base.served_model_names:
        raise bad_request(f"base_model_name '{req.base_model_name}' is not served here.", "base_model_name")
    try:  # reads a small JSON file (and lists the adapter's tensors): off the event loop
        await asyncio.to_thread(read_adapter_config, req.lora_path, adapters.max_lora_rank)
    except (ValueError, OSError) as exc:
        raise bad_request(
            f"The lora adapter at '{req.lora_path}' cannot be served: {exc}", "lora_path"
        ) from None
    return Adapter(name, req.lora_path, base.served_model_names[0])
