"""The optional peer for the HTTP cases: a LiteLLM proxy proxying an image request.

LiteLLM (`litellm[proxy]`, master key only, `LITELLM_LOCAL_MODEL_COST_MAP=True`) runs
from its own venv, `.bench/litellm` (made and installed on first use; several hundred
MB), or from the `litellm` binary named by `BENCH_LITELLM`. It serves
`POST /v1/images/generations` for a model routed to `bench/floors.py:openai_app`, an
OpenAI-shaped upstream that answers at once, served like the floors. When LiteLLM does
not install or start, the peer case is skipped and the reason printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import free_port
from bench.serving import ROOT, Server, floor, spawn

VENV = ROOT / ".bench" / "litellm"
MASTER_KEY = "sk-bench"
MODEL = "image"
BODY = {
    "model": MODEL,
    "prompt": "A futuristic city with flying cars and neon lights",
    "size": "1024x1024",
}


def litellm_binary() -> tuple[Path | None, str]:
    """(the `litellm` binary, "") or (None, why there is none)."""
    named = os.environ.get("BENCH_LITELLM")
    if named:
        path = Path(named)
        return (path, "") if path.exists() else (None, f"BENCH_LITELLM={named} does not exist")
    binary = VENV / "bin" / "litellm"
    if binary.exists():
        return binary, ""
    print(
        f"installing litellm[proxy] into {VENV} (once; set BENCH_LITELLM to reuse one)", flush=True
    )
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True, check=False
    )
    if made.returncode == 0:
        made = subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
            capture_output=True,
            text=True,
            check=False,
        )
    if made.returncode != 0 or not binary.exists():
        return None, "litellm[proxy] did not install: " + (made.stderr or made.stdout)[-300:]
    return binary, ""


def start(workdir: Path, prefix: list[str] | None = None) -> tuple[list[Server], str]:
    """The fake upstream and the proxy (run by `prefix`: `taskset`), ready; or ([], why
    not)."""
    binary, why = litellm_binary()
    if binary is None:
        return [], why
    upstream = floor("openai upstream", "openai_app", workdir)
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        "      model: openai/dall-e-3\n"
        f"      api_base: {upstream.url('/v1')}\n"
        "      api_key: sk-upstream\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    argv = [
        *(prefix or []),
        str(binary),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    try:
        proxy = spawn("peer: litellm", argv, env, port, workdir)
    except SystemExit as exc:
        upstream.stop()
        return [], f"litellm did not start: {str(exc)[-300:]}"
    return [upstream, proxy], ""
