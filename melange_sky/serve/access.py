"""Who may call what: the clients' API key for generation, the admin token for membership, either for what the
fleet's controller reads. Keys are compared in constant time and never logged; no key configured means open."""
from __future__ import annotations

import hmac

from aiohttp import web

from melange_sky.deploy.membership import ADMIN_TOKEN_ENV
from melange_sky.serve.openai_errors import error_response

__all__ = ["Access"]


def _bearer(request: web.Request, secret: bytes) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)


class Access:
    """Each check returns None (allowed) or the error to answer (401; 404 for an admin API that is off)."""

    def __init__(self, api_key: str | None, admin_token: str | None):
        self.key = api_key.encode() if api_key else None
        self.admin_token = admin_token.encode() if admin_token else None

    def client(self, request: web.Request) -> web.Response | None:
        """Generation and /v1/models: the API key."""
        if self.key is None or _bearer(request, self.key):
            return None
        return error_response(401, "invalid or missing API key: send it as 'Authorization: Bearer KEY'",
                              "invalid_request_error", "invalid_api_key")

    def reader(self, request: web.Request) -> web.Response | None:
        """The operator's endpoints (/routes, /workload, /metrics): the API key, or the admin token."""
        if self.key is None or (self.admin_token is not None and _bearer(request, self.admin_token)):
            return None
        return self.client(request)

    def admin(self, request: web.Request) -> web.Response | None:
        """The admin API (`GET`/`PUT /admin/routes`): the admin token only, never the clients' key."""
        if self.admin_token is None:
            return error_response(404, f"no admin API: this router was started without {ADMIN_TOKEN_ENV}",
                                  "invalid_request_error", "not_found")
        if _bearer(request, self.admin_token):
            return None
        return error_response(401, "invalid or missing admin token: send the fleet's admin token as "
                                   "'Authorization: Bearer TOKEN'", "invalid_request_error", "invalid_admin_token")
