"""Provider-compatible routes under `/compat/<provider>` (docs/api.md#compat): code
written against Krea's, Segmind's or flux-krea's own API works against the gateway with
its base URL and key changed. Each module speaks one provider's protocol; underneath,
every request is an ordinary gateway job (`Gateway.generate`, `Gateway.wait`).
"""

from __future__ import annotations

from gateway.compat import fluxkrea, krea, segmind

routes = [*krea.routes, *segmind.routes, *fluxkrea.routes]
