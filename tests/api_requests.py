"""Raw HTTP to a test server's APIs with its current key: the e2e and reliability suites' one request helper.

Raw ``requests`` on purpose (not client/api.py): the tests control every header, including a missing key.
"""
from __future__ import annotations

import requests

from serve.server import Server


def api_request(server: Server, method: str, path: str, key: str | None = "inference", api: str = "inference",
                timeout: float = 60, **kwargs) -> requests.Response:
    """``method`` request to ``path`` on the ``api`` ("inference" or "management") of ``server``, with
    ``Authorization: Bearer`` and the server's current key of kind ``key`` (None: no Authorization header).
    Extra ``kwargs`` go to ``requests.request``; a ``headers`` dict passed in is copied, never changed."""
    headers = dict(kwargs.pop("headers", None) or {})
    if key:
        headers["Authorization"] = f"Bearer {server.keys()[key]}"
    base = {"inference": server.inference_url, "management": server.management_url}[api]
    return requests.request(method, f"{base}{path}", headers=headers, timeout=timeout, **kwargs)
