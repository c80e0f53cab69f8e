"""`python -m gateway.healthcheck`: the container image's health check, for either role.

`gateway serve` answers `GET /healthz` on GATEWAY_PORT; `gateway worker` serves nothing
there, but answers it on GATEWAY_METRICS_PORT (`gateway/metrics_http.py`) while its
event loop runs. Exit 0 when the one that listens says so; 1 otherwise. The standard
library only: it runs every few seconds, and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def healthy(port: str) -> bool | None:
    """True or False as `/healthz` on `port` answers; None when nothing listens there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False
    except OSError:  # refused (or timed out): nothing answering on that port
        return None


def main() -> int:
    said = healthy(os.environ.get("GATEWAY_PORT", "8000"))
    metrics = os.environ.get("GATEWAY_METRICS_PORT")
    if said is None and metrics:  # a worker's container
        said = healthy(metrics)
    return 0 if said else 1


if __name__ == "__main__":
    sys.exit(main())
