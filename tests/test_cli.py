"""The `gateway` command as a user runs it: real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from tests.harness import gateway
from tests.servers import free_port, serve

GATEWAY = str(Path(sys.executable).with_name("gateway"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full.update(env or {})
    return subprocess.run(
        [GATEWAY, *args], capture_output=True, text=True, env=full, timeout=60, check=False
    )


def test_keys_create_list_revoke_and_credits(redis_url: str) -> None:
    env = {"GATEWAY_REDIS_URL": redis_url}
    made = run(
        "keys", "create", "--plan", "starter", "--credits", "50", "--name", "ci", "--json", env=env
    )
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert set(key) == {"id", "key", "plan", "credits", "webhookSecret"}
    assert key["plan"] == "starter" and key["credits"] == 50
    assert key["key"].startswith("gk_") and key["webhookSecret"].startswith("whsec_")

    listed = json.loads(run("keys", "list", "--json", env=env).stdout)
    assert [k["id"] for k in listed] == [key["id"]]
    # A leaked key is replaced, the account kept (tests/test_admission.py: the old refused).
    rotated = json.loads(run("keys", "rotate", key["id"], "--json", env=env).stdout)
    assert rotated["id"] == key["id"] and rotated["key"] not in ("", key["key"])
    assert (rotated["credits"], rotated["webhookSecret"]) == (50, key["webhookSecret"])
    assert run("keys", "rotate", "nosuchkey", env=env).returncode == 1
    assert key["key"] not in json.dumps(listed)  # the key itself is never shown again
    for columns in ("80", "50"):  # the table shows the id whole, to paste into `revoke`
        table = run("keys", "list", env={**env, "COLUMNS": columns}).stdout
        assert key["id"] in table, table

    # A name is the user's text: printed whole, as JSON that parses, and never as markup.
    name = "team [prod] with a name long enough to pass the eighty columns of a pipe's width"
    named = json.loads(run("keys", "create", "--name", name, "--json", env=env).stdout)
    updated = run("keys", "update", named["id"], "--rpm", "5", env=env)
    assert json.loads(updated.stdout)["name"] == name, updated.stdout
    assert "team [prod]" in run("keys", "list", env={**env, "COLUMNS": "200"}).stdout
    assert run("keys", "revoke", named["id"], env=env).returncode == 0

    added = run("credits", "add", key["id"], "25", env=env)
    assert "75" in added.stdout
    corrected = run("credits", "add", key["id"], "-100", env=env)
    assert corrected.returncode == 1  # a balance never goes below zero
    assert run("keys", "revoke", key["id"], env=env).returncode == 0
    assert json.loads(run("keys", "list", "--json", env=env).stdout)[0]["revoked"] is True
    narrow = run("keys", "create", "--credits", "1", env={**env, "COLUMNS": "40"}).stdout
    # One line, for scripts: the whole secret (24 bytes in base64) after its label.
    assert re.search(r"webhook secret whsec_[A-Za-z0-9+/]{32}$", narrow, re.MULTILINE), narrow
    assert re.search(r"^API key: gk_\S{40,}$", narrow, re.MULTILINE), narrow
    bad = run("keys", "create", "--plan", "platinum", env=env)
    assert bad.returncode == 1 and "unknown plan" in bad.stderr


def test_commands_needing_shared_redis_refuse_the_embedded_store() -> None:
    for args in (("worker",), ("keys", "list"), ("usage", "someid")):
        result = run(*args)
        assert result.returncode == 2
        assert "GATEWAY_REDIS_URL" in result.stderr


def test_a_plain_misconfiguration_is_a_line_naming_the_variable_and_exit_2(
    tmp_path: Path,
) -> None:
    """Each of these was a traceback (serve's from uvicorn's start-up, exit 3); a value is
    never quoted back, since it may hold a password."""
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    plans = tmp_path / "plans.toml"
    plans.write_text("[plans]\nteam = 5\n")
    typed = tmp_path / "typed.toml"
    typed.write_text('[plans.team]\nrpm = "fast"\n')
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text("[plans.team]\nrmp = 120\n")  # not a limit: was read as unlimited
    singular = tmp_path / "singular.toml"
    singular.write_text("[plan.team]\nrpm = 120\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        ({"GATEWAY_REDIS_URL": "s3cret@localhost:6379"}, "GATEWAY_REDIS_URL: "),
        ({"GATEWAY_URL_ALLOW_CIDRS": "10.0.0.0/8;192.168.0.0/16"}, "GATEWAY_URL_ALLOW_CIDRS: "),
        ({"GATEWAY_URL_ALLOW_CIDRS": "10.0.0.0/8,[/x]"}, "GATEWAY_URL_ALLOW_CIDRS: "),
        ({"GATEWAY_CONFIG": str(plans)}, "plans.team in "),
        ({"GATEWAY_CONFIG": str(typed)}, "plans.team.rpm in "),
        ({"GATEWAY_CONFIG": str(misspelt)}, "plans.team.rmp in "),
        ({"GATEWAY_CONFIG": str(singular)}, "plan in "),
        ({"GATEWAY_PLANS": '{"team": {"rmp": 120}}'}, "GATEWAY_PLANS: team.rmp: "),
        (
            {"GATEWAY_STORAGE_DIR": str(a_file / "outputs"), "GATEWAY_REDIS_URL": unreachable},
            "GATEWAY_STORAGE_DIR ",
        ),
    ]
    for env, says in cases:
        for args in (("serve", "--port", str(free_port())), ("worker",)):
            result = run(*args, env={"GATEWAY_PUBLIC_URL": "https://images.example.com", **env})
            assert result.returncode == 2, (args, env, result.stderr)
            assert result.stderr.startswith(f"configuration error: {says}"), result.stderr
            assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def test_a_redis_that_cannot_be_reached_is_one_line_naming_it_not_a_traceback() -> None:
    port = free_port()
    env = {
        "GATEWAY_REDIS_URL": f"redis://:s3cret@127.0.0.1:{port}/0",
        "GATEWAY_PUBLIC_URL": "https://images.example.com",
    }
    for args in (("keys", "list"), ("worker",), ("serve", "--port", str(free_port()))):
        result = run(*args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.startswith(f"cannot use the Redis at 127.0.0.1:{port}: ")
        assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def test_a_worker_without_a_public_url_says_what_its_output_urls_will_name() -> None:
    """A worker serves nothing: the URLs it hands out name `gateway serve`'s address only
    through GATEWAY_PUBLIC_URL."""
    result = run("worker", env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    first = result.stderr.splitlines()[0]
    assert first.startswith("GATEWAY_PUBLIC_URL is not set: output URLs will name "), first
    assert "http://127.0.0.1:8000" in first


def test_serve_in_dev_mode_prints_a_key_that_runs_the_seed_example(tmp_path: Path) -> None:
    """What `make run` does: embedded store, dev mode, a printed demo key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_DEV": "1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_STORAGE_DIR": str(tmp_path / "out"),
        }
    )
    proc = subprocess.Popen(
        [GATEWAY, "serve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("API key: "), line
        key = line.split(": ", 1)[1].strip()
        assert re.fullmatch(r"Webhook secret: whsec_\S+\n", proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        query = (
            "mutation Generate($input: GenerateInput!) { generate(input: $input) "
            "{ id status type provider url metadata creditCost } }"
        )
        variables = {
            "input": {
                "type": "IMAGE",
                "provider": "flux-krea",
                "input": {"text": "A futuristic city"},
                "options": {"width": 1024, "height": 1024},
            }
        }
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
            job = c.post("/graphql", json={"query": query, "variables": variables}).json()
            job_id = job["data"]["generate"]["id"]
            deadline = time.monotonic() + 30
            while True:
                got = c.post(
                    "/graphql",
                    json={
                        "query": "query($id: ID!) { job(id: $id) { status url } }",
                        "variables": {"id": job_id},
                    },
                ).json()["data"]["job"]
                if got["status"] == "completed":
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert c.get(got["url"]).headers["content-type"] == "image/png"

        out = tmp_path / "city.png"
        gen = run(
            "generate",
            "a city",
            "--width",
            "512",
            "--height",
            "512",
            "--out",
            str(out),
            env={"GATEWAY_URL": base, "GATEWAY_API_KEY": key},
        )
        assert gen.returncode == 0, gen.stderr
        assert out.read_bytes().startswith(b"\x89PNG")
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status.
        assert proc.wait(20) in (0, -15)
        if proc.stdout:
            proc.stdout.close()


async def test_generate_downloads_the_image_without_sending_the_key(
    redis_url: str, tmp_path: Path
) -> None:
    """Outputs may be served from another host (GATEWAY_PUBLIC_URL, a bucket, a CDN): the
    API key goes only to the gateway."""
    seen: list[str | None] = []

    async def outputs(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        return FileResponse(tmp_path / "out" / request.path_params["name"])

    cdn_app = Starlette(routes=[Route("/outputs/{name}", outputs)])
    async with (
        serve(cdn_app) as cdn,
        gateway(redis_url, tmp_path / "out", public_url=cdn) as gw,
    ):
        key = await gw.key()
        out = tmp_path / "fox.png"
        env = {"GATEWAY_URL": gw.base, "GATEWAY_API_KEY": key}
        args = ("generate", "a fox", "--provider", "local", "--out", str(out))
        gen = await asyncio.to_thread(run, *args, env=env)
    assert gen.returncode == 0, gen.stderr
    assert out.read_bytes().startswith(b"\x89PNG")
    assert seen == [None]
