"""The error tree. Domain code raises these; the API layer alone maps them to HTTP.

GatewayError                 a coded error a client may see (`code`, HTTP `status`)
├── Unauthenticated          401  missing, unknown or revoked API key
├── Forbidden                403
├── BadUserInput             400  invalid parameter (names the `field`) or unknown provider
├── PayloadTooLarge          413
├── InsufficientCredits      402  with creditsRequired, creditsAvailable
├── RateLimited              429  with retryAfter (s) and limit: minute | day | concurrency | read
├── NotFound                 404
├── MethodNotAllowed         405  a route that exists, with another method
├── ProviderFailure          502  every backend of the route failed
├── ServiceUnavailable       503  Redis or storage unreachable, nothing routable (retryAfter)
└── InternalError            500  a bug; nothing internal is said

ProviderError                raised by backends, never seen by clients as such
├── ProviderTimeout          the upstream did not answer in time        -> fail over
├── ProviderRateLimited      429 from upstream (carries retry_after)     -> fail over
├── ProviderUnavailable      5xx, connection error, malformed answer, auth/credit trouble
│   │                                                                    -> fail over
│   └── ProviderJobFailed    the upstream ran the job and says it failed -> fail over,
│                                                                           circuit spared
└── ProviderRejected         the upstream refused the user's own input   -> no fail over
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    code = "INTERNAL_SERVER_ERROR"
    status = 500

    def __init__(self, message: str, **extensions: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extensions: dict[str, Any] = {"code": self.code, **extensions}
        self.headers: dict[str, str] = {}  # e.g. X-RateLimit-* of the refused key


class Unauthenticated(GatewayError):
    code, status = "UNAUTHENTICATED", 401

    def __init__(self, message: str, **extensions: Any) -> None:
        super().__init__(message, **extensions)
        # RFC 9110 §15.5.2: a 401 names the scheme it wants (no browser prompts for Bearer)
        self.headers["WWW-Authenticate"] = "Bearer"


class Forbidden(GatewayError):
    code, status = "FORBIDDEN", 403


class BadUserInput(GatewayError):
    code, status = "BAD_USER_INPUT", 400

    def __init__(self, message: str, field: str | None = None, **extensions: Any) -> None:
        if field:
            extensions["field"] = field
        super().__init__(message, **extensions)


class PayloadTooLarge(GatewayError):
    code, status = "PAYLOAD_TOO_LARGE", 413


class RequestTimeout(GatewayError):
    """A client too slow to send its request's headers (`client_deadlines`)."""

    code, status = "REQUEST_TIMEOUT", 408


class InsufficientCredits(GatewayError):
    code, status = "INSUFFICIENT_CREDITS", 402

    def __init__(self, required: int, available: int, why: str = "") -> None:
        super().__init__(
            f"Insufficient credits: {required} required, {available} available{why}",
            creditsRequired=required,
            creditsAvailable=available,
        )


class RateLimited(GatewayError):
    code, status = "RATE_LIMITED", 429

    def __init__(
        self,
        limit: str,
        retry_after: int,
        message: str | None = None,
        *,
        allowed: int | None = None,
        reset: int = 0,
    ) -> None:
        """`allowed`: the size of the limit that refused it, which its X-RateLimit-*
        headers then describe, used up until `reset` (unix s)."""
        super().__init__(
            message or f"Rate limit exceeded ({limit}); retry after {retry_after} s",
            retryAfter=retry_after,
            limit=limit,
        )
        self.retry_after = retry_after
        if allowed is not None:
            self.headers = {
                "X-RateLimit-Limit": str(allowed),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset),
            }


class NotFound(GatewayError):
    code, status = "NOT_FOUND", 404


class ProviderFailure(GatewayError):
    code, status = "PROVIDER_ERROR", 502


class ServiceUnavailable(GatewayError):
    """With `retryAfter` (and the Retry-After header): a client or an upstream calling
    back should try again, not give up (RFC 9110 §10.2.3)."""

    code, status = "SERVICE_UNAVAILABLE", 503

    def __init__(self, message: str, retry_after: int | None = 5) -> None:
        """`retry_after` None: trying again will not help until the operator acts."""
        if retry_after is None:
            super().__init__(message)
        else:
            super().__init__(message, retryAfter=retry_after)
        self.retry_after = retry_after


class MethodNotAllowed(GatewayError):
    code, status = "METHOD_NOT_ALLOWED", 405


class InternalError(GatewayError):
    code, status = "INTERNAL_SERVER_ERROR", 500


class ProviderError(Exception):
    """An upstream failed. `failover` says whether another backend may be tried."""

    failover = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        #: the unsuccessful upstream answer behind it, when there was one
        self.answer: Any = None


class ProviderTimeout(ProviderError):
    pass


class ProviderRateLimited(ProviderError):
    pass


class ProviderUnavailable(ProviderError):
    pass


class ProviderJobFailed(ProviderUnavailable):
    """The upstream took the job and reported it failed (Segmind's FAILED, content blocks
    included): failed over, but no sign the backend is down, so its circuit is spared."""


class ProviderRejected(ProviderError):
    failover = False


def _codes(cls: type[GatewayError]) -> dict[str, int]:
    out = {cls.code: cls.status}
    for sub in cls.__subclasses__():
        out.update(_codes(sub))
    return out


#: HTTP status of each error code (docs/api.md#errors), from the classes above.
STATUS_BY_CODE: dict[str, int] = _codes(GatewayError)


def renamed(exc: GatewayError, names: dict[str, str]) -> GatewayError:
    """`exc` naming its field as another protocol does (`names`: ours -> theirs), in its
    `field` and its message; a message that names `webhookUrl` without a field (a client
    token's refusal) too. Idempotent; `exc` itself is changed and returned."""
    ours = exc.extensions.get("field")
    if not isinstance(ours, str):
        ours = "webhookUrl" if "webhookUrl" in exc.message else None
    theirs = names.get(ours) if ours else None
    if ours is None or theirs is None:
        return exc
    exc.message = exc.message.replace(ours, theirs, 1)
    if "field" in exc.extensions:
        exc.extensions["field"] = theirs
    return exc
