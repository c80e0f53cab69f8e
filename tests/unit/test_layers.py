"""Which module may import which: dependencies point one way, down the layers.

Lowest first (a module may import its own layer and those below it):

    domain     errors, params, pricing, config, origins, urlguard, formats, images, jobs/model,
               providers/base, breaker, metrics (the families, counted by every layer),
               telemetry (the log context and the tracer, used by every layer),
               timeouts (waiting with a time limit)
    store      gateway/store, jobs/store, auth, accounts, tokens, admission, cache,
               events, job_watch, callbacks, artifacts, artifacts_s3, usage
               | providers gateway/providers
    jobs       jobs/queue, jobs/worker, routing, upstream_wait, webhooks
    service    service (the operations both APIs call)
    api        schema/ (GraphQL), rest (REST), pages (the playground), openai_api,
               compat/ (the providers' own protocols), endpoints (their JSON routes' base),
               bodies (their request bodies)
    root       app, client_deadlines, cors, runtime, cli, metrics_http, telemetry_http (the
               composition root: wires the parts together and serves them)

`store` and `providers` sit side by side and do not import each other. `bench/` may
import anything of the gateway, which never imports it. Imports are read from the source
with `ast` (those inside functions and `if TYPE_CHECKING:` count too), so nothing here
imports the modules it checks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "schema", "bench")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "domain",
        (
            "gateway",
            "gateway.errors",
            "gateway.params",
            "gateway.pricing",
            "gateway.config",
            "gateway.origins",
            "gateway.urlguard",
            "gateway.formats",
            "gateway.images",
            "gateway.breaker",
            "gateway.metrics",
            "gateway.telemetry",
            "gateway.timeouts",
            "gateway.jobs",
            "gateway.jobs.model",
            "gateway.providers.base",
        ),
    ),
    (
        "store",
        (
            "gateway.store.*",
            "gateway.jobs.store",
            "gateway.auth",
            "gateway.accounts",
            "gateway.tokens",
            "gateway.admission",
            "gateway.cache",
            "gateway.events",
            "gateway.job_watch",
            "gateway.callbacks",
            "gateway.artifacts",
            "gateway.artifacts_s3",
            "gateway.usage",
        ),
    ),
    ("providers", ("gateway.providers.*",)),
    (
        "jobs",
        (
            "gateway.jobs.queue",
            "gateway.jobs.worker",
            "gateway.routing",
            "gateway.upstream_wait",
            "gateway.webhooks",
        ),
    ),
    ("service", ("gateway.service",)),
    (
        "api",
        (
            "schema.*",
            "gateway.endpoints",
            "gateway.bodies",
            "gateway.rest",
            "gateway.pages",
            "gateway.openai_api",
            "gateway.compat",
            "gateway.compat.*",
        ),
    ),
    (
        "root",
        (
            "gateway.app",
            "gateway.client_deadlines",
            "gateway.cors",
            "gateway.runtime",
            "gateway.cli",
            "gateway.healthcheck",
            "gateway.metrics_http",
            "gateway.telemetry_http",
        ),
    ),
    ("tools", ("bench.*",)),
]
RANK = {"domain": 0, "store": 1, "providers": 1, "jobs": 2, "service": 3, "api": 4}
RANK.update({"root": 5, "tools": 6})
SIDE_BY_SIDE = {frozenset({"store", "providers"})}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> Iterator[str]:
    """The modules of ours that `name` imports (`from a import b` is `a.b` when b is a
    module, else `a`)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of ours, or not ours
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: sorted(set(imports(name, path))) for name, path in MODULES.items()}


def layer_of(name: str) -> str | None:
    best: tuple[int, str] | None = None
    for layer, patterns in LAYERS:
        for pattern in patterns:
            if pattern.endswith(".*"):
                prefix = pattern[:-2]
                hit = name == prefix or name.startswith(prefix + ".")
                length = len(prefix)
            else:
                hit, length = name == pattern, len(pattern) + 1  # exact beats a prefix
            if hit and (best is None or length > best[0]):
                best = (length, layer)
    return best[1] if best else None


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in MODULES if layer_of(name) is None]
    assert not unplaced, f"place these modules in a layer of {__name__}.LAYERS: {unplaced}"


def test_the_graph_sees_the_known_imports() -> None:
    """A guard on the reader itself: edges that exist must be found."""
    assert "schema" in GRAPH["gateway.app"]
    assert "gateway.service" in GRAPH["schema.context"]
    assert "gateway.callbacks" in GRAPH["gateway.routing"]  # under TYPE_CHECKING
    assert "schema.limits" in GRAPH["schema.prepared"]  # `from schema import limits`


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    mine = layer_of(name)
    if mine is None:
        pytest.skip("not placed (see test_every_module_has_a_layer)")
    wrong = []
    for target in GRAPH[name]:
        theirs = layer_of(target)
        if theirs is None or theirs == mine:
            continue
        if RANK[theirs] > RANK[mine] or frozenset({mine, theirs}) in SIDE_BY_SIDE:
            wrong.append(f"{target} ({theirs})")
    assert not wrong, f"{name} ({mine}) imports from a layer it may not use: {wrong}"


def test_only_the_composition_root_imports_the_graphql_layer() -> None:
    importers = {
        name
        for name, targets in GRAPH.items()
        if name.startswith("gateway") and any(t.partition(".")[0] == "schema" for t in targets)
    }
    assert importers <= {"gateway.app", "gateway.runtime", "gateway.cli"}, importers


def test_no_import_cycles() -> None:
    """Between modules (a package's own `__init__` running first is not an edge)."""
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in GRAPH[name]:
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
