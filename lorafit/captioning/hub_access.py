"""Captioning models by hub id: the local cache first, the network only when it can answer.

Given a hub id, transformers and huggingface_hub ask the Hub for every file, and without a network
they retry each request with back-off (five retries, up to 8 s apart): ``lorafit caption --model
Salesforce/blip-image-captioning-large`` on a machine without network sat for minutes before
failing. Here a model already in the local Hugging Face cache loads with ``local_files_only``
(no request at all); one that is not is fetched only after a single short request shows the Hub
answers, else the command stops at once with one line saying what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lorafit.errors import LorafitError

T = TypeVar("T")
PROBE_TIMEOUT_S = 5.0


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One request to the Hub endpoint (``HF_ENDPOINT``, proxies honoured), no retries: does it answer?"""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, TLS, proxy: all mean "no answer"
        return False
    return True


def cache_first(model: str, load: Callable[[bool], T], flag: str = "--model") -> T:
    """``load(local_files_only)`` for ``model``: from a folder or the cache, else from a Hub that answers.

    Args:
        model: A local folder or a Hugging Face hub id.
        load: Loads the model; called with True to read the local cache only, False to allow downloads.
        flag: The option the model came from, named in the error.

    Raises:
        LorafitError: When the model is neither local nor cached and the Hub cannot be reached.
    """
    if Path(model).expanduser().is_dir():
        return load(False)
    try:
        return load(True)
    except OSError:  # transformers/huggingface_hub: "not found in the local cache"
        pass
    where = "HF_HUB_OFFLINE is set" if hub_offline() else None
    if where is None and not hub_reachable():
        from huggingface_hub import constants

        where = f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached"
    if where:
        raise LorafitError(
            f"{flag} {model} is not in the local Hugging Face cache and {where}; download it where there is "
            f"a network (`hf download {model}`, then copy HF_HOME) or pass a local folder"
        )
    return load(False)
