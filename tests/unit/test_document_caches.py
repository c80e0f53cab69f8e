"""The parsed documents, their validation and their prepared plans are kept for every
request, anonymous ones included: bounded by the tokens they hold (`schema.bounded`),
unique documents sent at the token limit cannot grow a process's memory."""

from __future__ import annotations

import gc
import tracemalloc

import schema
from schema.bounded import TokenBounded, weight


def test_unique_documents_at_the_token_limit_hold_a_bounded_memory() -> None:
    """Each such document held about 1 MB: 512 of them (the entries a cache kept) over
    half a GB, before any key was checked."""
    gateway_schema = schema.build_schema()
    prepared = schema.prepared(gateway_schema)
    rules = gateway_schema._create_execution_context(None, ()).validation_rules
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(60):
            query = f"#{i}\n{{ providers {{ {' '.join(['name'] * 1990)} }} }}"
            document = schema._parse(query)
            schema._validate(gateway_schema._schema, document, rules)
            prepared.plan(query)
        del document
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 40 * 2**20, f"{held / 2**20:.0f} MB held"
    for cache in (schema._documents, schema._validations, prepared._plans):
        assert cache.held <= cache.budget


def test_the_documents_clients_send_again_stay_kept() -> None:
    """Small documents, sent again, are parsed once, while large ones come and go."""
    parsed: list[str] = []
    cache: TokenBounded[str, str] = TokenBounded(budget=100)

    def make(text: str) -> tuple[str, int]:
        parsed.append(text)
        return text, len(text)

    for _ in range(3):
        assert cache.get("poll", make) == "poll"
        cache.get("x" * 60, make)  # pushes out what is least recent
    assert parsed.count("poll") == 1
    assert cache.get("y" * 101, make) == "y" * 101  # over it: not kept
    assert len(cache) == 2 and cache.held == 64


def test_a_text_weighs_at_least_its_length_over_32() -> None:
    """A document of long comments parses to a few tokens, but its entry holds its
    text: 16 KB of it weighs as 512 tokens."""
    text = "{ providers { name } }\n#" + "c" * (16 * 1024 - 30)
    document = schema.parse_document(text, **schema.PARSE_OPTIONS)
    assert weight(text, document) == len(text) // 32
    assert weight("{ a }", schema.parse_document("{ a }")) == 5  # { a } and <SOF>, <EOF>
