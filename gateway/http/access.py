"""The door's half of API authorization: describe the call, then ask the hub's policy.

Each handler of the user, auditor and operator API calls ``authorize`` first, with the
resource it touches when there is one (a task: read before deciding, so the policy sees its
owner and state). The decision and what it maps to are in ``gateway.routers.access``.

Between authentication and the policy come the caller's rate limits (``gateway.limits``):
a call over one is refused (429) before anything is evaluated or logged.
``admit_submission`` adds the submission's own limits for ``POST /v1/tasks``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.http.appkeys import HUB
from gateway.http.middlewares import authenticate_optional
from gateway.identity.apikeys import Subject
from gateway.limits.limiter import Reservation
from gateway.routers.access import Access, ApiCall

# Query parameters passed to the policy: at most this many, each at most this long, so a
# request cannot make the policy input (and its log record) large.
MAX_PARAMS = 32
MAX_PARAM_CHARS = 256


def api_call(request: web.Request) -> ApiCall:
    """The call as the policy sees it: method, route template, parameters, peer."""
    info = request.match_info
    resource = info.route.resource
    route = resource.canonical if resource is not None else request.path
    params: dict[str, Any] = dict(info)
    for name, value in list(request.query.items())[:MAX_PARAMS]:
        params.setdefault(name, value[:MAX_PARAM_CHARS])
    # HEAD is answered by the GET handler and is the same read.
    method = "GET" if request.method == "HEAD" else request.method
    return ApiCall(
        method=method,
        route=route,
        params=params,
        protocol="http",
        remote_addr=remote_addr(request),
    )


def remote_addr(request: web.Request) -> str | None:
    """The peer's address (what an anonymous caller's limits are keyed by)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if peer else None


def admit_submission(request: web.Request) -> Reservation:
    """The submission limits of the caller (its ``submit`` bucket, its ``pending`` quota),
    before any policy; use as ``with admit_submission(request):`` around the submission."""
    return request.app[HUB].limiter.submission(authenticate_optional(request), remote_addr(request))


async def authorize(
    request: web.Request, resource: dict[str, Any] | None = None, *, defer: bool = False
) -> tuple[Subject | None, Access]:
    """Authenticate (if a key is presented) and decide the call; raise on a denial.
    ``defer``: an allowed change's record comes back unwritten (``ApiAuthorizer``)."""
    subject = authenticate_optional(request)
    hub = request.app[HUB]
    public = resource is not None and resource.get("kind") == "public"
    if not hub.has_config and public:
        # With no policy loaded at all the hub is degraded; its health, readiness, metrics
        # and description stay up so operators can see why. Every other call is a 503.
        return subject, Access(None, "own")
    if not public:
        # Probes of health and metrics are never limited: a flood must not blind them.
        hub.limiter.api_call(subject, remote_addr(request))
    access = await hub.access.authorize(subject, api_call(request), resource, defer=defer)
    return subject, access


async def authorize_subject(
    request: web.Request, resource: dict[str, Any] | None = None, *, defer: bool = False
) -> tuple[Subject, Access]:
    """``authorize`` for calls that need a key: the policy refuses anonymous callers."""
    subject, access = await authorize(request, resource, defer=defer)
    if subject is None:
        # Only a policy that allows an anonymous caller a keyed call gets here.
        from gateway.errors import Unauthorized

        raise Unauthorized("missing API key (send 'Authorization: Bearer <key>')")
    return subject, access
