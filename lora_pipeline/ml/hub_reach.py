"""Is the Hugging Face Hub reachable from here? Asked once before hub calls, so a machine without a network is
told at once instead of after the hub client's retries (a minute and a cache error). Dagster-free."""

from __future__ import annotations

import socket
import time
import urllib.request
from urllib.parse import urlsplit

CONNECT_TIMEOUT_SECONDS = 3.0
# Sensors ask every few seconds: a network that comes back is noticed within this long.
REMEMBER_SECONDS = 60.0
_last: dict[str, tuple[float, str | None]] = {}


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (HF_HUB_OFFLINE set, no route or name, nothing listening), or None when a
    TCP connection to its endpoint (HF_ENDPOINT, default https://huggingface.co) opens: to the proxy the hub client
    would go through (HTTPS_PROXY and its kin, unless NO_PROXY names the host), which is the first hop there."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    endpoint = constants.ENDPOINT
    remembered = _last.get(endpoint)
    if remembered is not None and time.monotonic() - remembered[0] < REMEMBER_SECONDS:
        return remembered[1]
    parts = urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
        reason = None
    except OSError as exc:  # DNS failure, refused, unreachable, timed out
        reason = f"cannot reach {parts.hostname}:{port} ({exc.strerror or type(exc).__name__})"
    _last[endpoint] = (time.monotonic(), reason)
    return reason
