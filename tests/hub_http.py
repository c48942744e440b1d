"""The Hub's HTTP boundary for tests: ``huggingface_hub``'s own client runs, its transport answers locally.

Serves the two endpoints the push check asks (``/api/whoami-v2`` and ``/api/models/<repo>/auth-check/write``) from
a table of tokens and repositories, the way the Hub answers them (401 for an unknown token, 404 with
``X-Error-Code: RepoNotFound`` for a missing repository, 403 without write access).
"""

from __future__ import annotations

import contextlib
import re

import httpx2
import huggingface_hub
from huggingface_hub.utils._http import default_client_factory


def whoami(name: str, role: str = "write", orgs: dict[str, str] | None = None) -> dict:
    """A ``whoami-v2`` answer: the user, its organizations ``{name: roleInOrg}`` and the token's role."""
    return {
        "type": "user",
        "name": name,
        "orgs": [{"name": org, "roleInOrg": r} for org, r in (orgs or {}).items()],
        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}},
    }


class HubHTTP:
    """Tokens ``{token: whoami answer}`` and repositories ``{repo_id: users who may write}``."""

    def __init__(self, tokens: dict[str, dict] | None = None, repos: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.repos = dict(repos or {})
        self.requests: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        me = self.tokens.get(token)
        if path == "/api/whoami-v2":
            if me is None:
                return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"})
            return httpx2.Response(200, json=me)
        match = re.fullmatch(r"/api/models/(.+)/auth-check/write", path)
        if match:
            repo = match.group(1)
            if repo not in self.repos:
                return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "not found"})
            if me is None or me["name"] not in self.repos[repo]:
                return httpx2.Response(403, json={"error": "You don't have the rights to write to this repository"})
            return httpx2.Response(200, json={})
        return httpx2.Response(500, json={"error": f"unexpected request {path}"})


@contextlib.contextmanager
def hub_transport():
    """A :class:`HubHTTP` answering every request ``huggingface_hub`` sends inside the block."""
    server = HubHTTP()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(server)))
    try:
        yield server
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
