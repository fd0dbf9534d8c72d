"""The HTTP doors: parse, authenticate, map errors; no routing logic of their own.

Parts:

- ``app``: the aiohttp application and the native ``/v1`` user, auditor and operator API;
- ``agent_routes``: the routes agent containers call (messages, results, identity);
- ``agent_app``: the listener agents reach (those routes only, on the same hub), and how
  ``serve`` starts both listeners;
- ``middlewares``: body limits, API-key authentication, the one error-to-HTTP mapping;
- ``audit``: the read-only audit page and its verify endpoint;
- ``openapi``, ``agent_openapi``: the OpenAPI 3.1 description of all of the above.
"""
