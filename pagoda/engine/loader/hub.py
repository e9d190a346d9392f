"""Hugging Face Hub ids -> local snapshot directories (through the shared HF cache)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pagoda.engine.loader import ModelLoadError

# what a model directory needs; GGUF repos hold many quantizations, so *.gguf is never fetched whole
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_hub_id(source: str) -> bool:
    """`org/name` with Hub-legal characters (and not a relative path like ./x or x.gguf)."""
    return bool(_HUB_ID_RE.match(source)) and not source.lower().endswith(".gguf") and ".." not in source


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def download(repo_id: str) -> Path:
    """The local snapshot of `repo_id`, downloading what is missing unless HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_ALLOW_PATTERNS, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        how = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and is not in the Hugging Face cache ({how}); "
            f"download it first (`hf download {repo_id}`) with network access, or pass a local path"
        ) from e
    except GatedRepoError as e:
        raise ModelLoadError(
            f"Hub repo {repo_id!r} is gated; accept its license on huggingface.co and set HF_TOKEN"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and no such Hub repo was found; check the name "
            "(private repos need HF_TOKEN)"
        ) from e
    except OSError as e:  # network failures surface as OSError subclasses
        raise ModelLoadError(f"could not fetch Hub repo {repo_id!r}: {e}") from e
