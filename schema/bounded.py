"""A least-recently-used cache bounded by the parsed tokens its values hold, not by
their count: the parsed documents, their validation and their prepared plans, shared
by every request, anonymous ones included.

A parsed document holds about half a KB for each of its tokens (its nodes, their
locations, the tokens themselves), and a client may send up to `MAX_TOKENS` of them
in 16 KB of text: bounded by entries alone (512), unique documents at the token limit
held over half a GB a process. Bounded by tokens, a cache holds many small documents
(the documents clients send, sent again) or few large ones, and never more than its
budget. (functools.lru_cache weighs nothing: a few lines of our own.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from graphql import DocumentNode

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: The tokens each cache may hold in all: a few hundred of the documents clients send
#: (tens to a few hundred tokens each), or sixteen at the token limit; about 17 MB.
TOKENS = 32 * 1024


def weight(query: str, document: DocumentNode | None = None) -> int:
    """What keeping `query` (and `document`, parsed from it) costs: the tokens it was
    parsed from (its own chain, walked once), or its text's length over 32 if more (a
    text of long comments and strings holds few tokens; an entry holds its text)."""
    count, loc = 0, document.loc if document is not None else None
    token = loc.start_token if loc is not None else None
    while token is not None:
        count += 1
        token = token.next
    return max(count, len(query) // 32, 1)


class TokenBounded(Generic[K, V]):
    def __init__(self, budget: int = TOKENS) -> None:
        self.budget = budget
        self.held = 0
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def get(self, key: K, make: Callable[[K], tuple[V, int]]) -> V:
        """The value kept for `key`, else `make(key)`'s (the value, and the tokens it
        holds): kept unless it alone is over the budget, the least recently used values
        dropped to make room. An exception from `make` is raised, and nothing kept."""
        entries = self._entries
        kept = entries.get(key)
        if kept is not None:
            entries.move_to_end(key)
            return kept[0]
        value, weight = make(key)
        if weight <= self.budget:
            entries[key] = (value, weight)
            self.held += weight
            while self.held > self.budget:
                _, (_, dropped) = entries.popitem(last=False)
                self.held -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)
