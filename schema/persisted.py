"""Automatic persisted queries: Apollo's protocol (docs/api.md#persisted-queries).

A request (POST body, or GET's query string) may carry
`extensions: {"persistedQuery": {"version": 1, "sha256Hash": HEX}}`:

- with its `query`: the hash must be the SHA-256 of the query's text (UTF-8), else
  400 `BAD_USER_INPUT`; a text over `apq_max_document_bytes` is 413
  `PAYLOAD_TOO_LARGE`. The request runs as any other; once it has run for an
  authenticated caller, the document is stored (`gateway/store/persisted.py`), so
  anonymous clients cannot fill the store, and a document that is not stored is still
  answered;
- without it: the stored document runs, exactly as if its text had been sent (the
  prepared path included); an unknown hash answers HTTP 200 with the error Apollo's link
  looks for (`PERSISTED_QUERY_NOT_FOUND`, message `PersistedQueryNotFound`), and the
  client sends the text.

Hand-written because Strawberry has no APQ (Apollo implements it in Apollo Server, in
JavaScript); the protocol is these few rules.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import BadUserInput, PayloadTooLarge
from gateway.store.persisted import sha256_hex

NOT_FOUND_CODE = "PERSISTED_QUERY_NOT_FOUND"
NOT_FOUND_MESSAGE = "PersistedQueryNotFound"  # Apollo's link matches the message or the code
VERSION = 1
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
FIELD = "extensions.persistedQuery"


def requested(extensions: Any) -> str | None:
    """The hash (lower-case hex) a request's `extensions` asks for, or None when it asks
    for none. A malformed one is BAD_USER_INPUT."""
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        raise BadUserInput("`extensions` must be an object", field="extensions")
    asked = extensions.get("persistedQuery")
    if asked is None:
        return None
    if not isinstance(asked, dict):
        raise BadUserInput(f"`{FIELD}` must be an object", field=FIELD)
    version = asked.get("version")
    if type(version) is not int or version != VERSION:
        shown = version if type(version) is int else type(version).__name__  # never echoed
        raise BadUserInput(
            f"unsupported persisted query version {shown}: only {VERSION}",
            field=f"{FIELD}.version",
        )
    sha = asked.get("sha256Hash")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        raise BadUserInput(
            "`sha256Hash` must be the document's SHA-256 in hex (64 characters)",
            field=f"{FIELD}.sha256Hash",
        )
    return sha.lower()


def check_text(sha: str, query: str, max_bytes: int) -> None:
    """A document sent with its hash: bounded, and the hash its own."""
    size = len(query.encode())
    if size > max_bytes:
        raise PayloadTooLarge(
            f"persisted query document of {size} bytes; at most {max_bytes} are stored"
        )
    if sha256_hex(query) != sha:
        raise BadUserInput(
            "provided sha256Hash does not match the query", field=f"{FIELD}.sha256Hash"
        )
