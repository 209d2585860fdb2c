"""The Hugging Face Hub without a network: one quick reachability check, then the local cache only.

``datasets`` and ``huggingface_hub`` retry every request with a back-off (``Retrying in 1s``,
2s, 4s, 8s, 8s: about 25 s of warnings per file) before they give up or fall back to their
cache. Before either is asked for a Hub name, ``offline_reason()`` sends one HEAD request to
the endpoint (``HF_ENDPOINT``, default https://huggingface.co) with a short timeout; when
nothing answers it switches both libraries to offline mode (``HF_HUB_OFFLINE=1``), so a cached
tokenizer or dataset loads at once and a missing one fails at once. ``not_cached_error`` is
the one line that failure prints: what is missing, where the cache is, why the Hub was not
asked, and the command that downloads it where there is a network.

The check runs once per process and endpoint. When ``HF_HUB_OFFLINE`` (or
``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) is already set, nothing is sent.

Caution / known limits: the check reaches the endpoint itself (through the proxy variables
urllib honours); a Hub that answers but then fails a download still gives the libraries'
own errors, retries included.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
import urllib.error
import urllib.request
from typing import Optional

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Seconds the reachability check waits for the endpoint to answer.
PROBE_TIMEOUT_S = 3.0
#: The variables that put the Hub libraries in offline mode (any one of them, set true).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}

_unreachable: dict[str, Optional[str]] = {}
_switched_offline: Optional[str] = None  # why offline_reason() switched offline mode on


def hub_endpoint() -> str:
    """The Hub the libraries talk to: ``HF_ENDPOINT``, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_requested() -> Optional[str]:
    """The offline variable the user set (``"HF_HUB_OFFLINE"``, ...), or None."""
    return next((v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().upper() in _TRUE), None)


def hub_unreachable(endpoint: Optional[str] = None, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when ``endpoint`` answers one HEAD request within ``timeout`` seconds, else why it did not
    (remembered per endpoint, so a process asks once).

    Any HTTP answer counts, an error status or a certificate the system does not trust included:
    the Hub is there, and the library's own request will say what is wrong.
    """
    endpoint = endpoint or hub_endpoint()
    if endpoint not in _unreachable:
        _unreachable[endpoint] = _probe(endpoint, timeout)
    return _unreachable[endpoint]


def _probe(url: str, timeout: float) -> Optional[str]:
    failure: list[Optional[str]] = []

    def attempt() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            failure.append(None)
        except urllib.error.HTTPError:
            failure.append(None)
        except urllib.error.URLError as err:
            failure.append(None if isinstance(err.reason, ssl.SSLError) else _reason_text(err.reason))
        except (OSError, ValueError) as err:
            failure.append(_reason_text(err))

    # NOTE: the timeout covers connecting and reading, not the name lookup; a resolver that hangs
    # is cut off by the join, and the daemon thread is left to finish on its own.
    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return failure[0] if failure else f"no answer within {timeout:g} s"


def _reason_text(reason) -> str:
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "no answer within the timeout"
    text = getattr(reason, "strerror", None) or str(reason)
    return text.strip().splitlines()[0] if text.strip() else type(reason).__name__


def enter_offline_mode() -> None:
    """Offline mode for ``huggingface_hub``, ``datasets`` and ``tokenizers``, in this process and its children.

    The libraries read ``HF_HUB_OFFLINE`` when they are imported; one already imported has its
    flag set here as well.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


def offline_reason() -> Optional[str]:
    """None when the Hub may be asked; else why not, with offline mode switched on.

    Call before a library is given a Hub name: then nothing it does waits on the network.
    """
    global _switched_offline
    if _switched_offline is not None:
        return _switched_offline  # this process found the Hub unreachable and set HF_HUB_OFFLINE itself
    variable = offline_requested()
    if variable is not None:
        return f"{variable}={os.environ[variable]} is set, so the Hub is not asked"
    endpoint = hub_endpoint()
    failure = hub_unreachable(endpoint)
    if failure is None:
        return None
    enter_offline_mode()
    _switched_offline = f"the Hugging Face Hub cannot be reached ({endpoint}: {failure})"
    return _switched_offline


def _shown(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if path == home or path.startswith(home + os.sep) else path


def hub_cache() -> str:
    """Where ``huggingface_hub`` keeps downloaded files (models, tokenizers)."""
    from huggingface_hub import constants

    return _shown(constants.HF_HUB_CACHE)


def datasets_cache() -> str:
    """Where ``datasets`` keeps the prepared datasets it can load offline."""
    from datasets import config

    return _shown(str(config.HF_DATASETS_CACHE))


def tokenizer_download_command(name: str) -> str:
    return f"hf download {name} tokenizer.json"


def dataset_download_command(name: str, config: Optional[str], split: Optional[str]) -> str:
    args = ", ".join(repr(a) for a in (name, config) if a is not None)
    if split is not None:
        args += f", split={split!r}"
    return f"python -c \"import datasets; datasets.load_dataset({args})\""


def not_cached_error(setting: str, what: str, cache: str, download: str, reason: str,
                     instead: str) -> ValueError:
    """The one line for a Hub tokenizer or dataset that is needed, not cached and cannot be downloaded."""
    return ValueError(
        f"{setting}: {what} is not in the local cache ({cache}) and {reason}; where there is a network, "
        f"download it with `{download}` (into the same HF_HOME, or copy that folder here), and HF_HUB_OFFLINE=1 "
        f"then uses the cache without asking the Hub; or use {instead}"
    )
