"""The typed keys of the aiohttp applications' state, declared once (aiohttp's ``AppKey``)."""

from __future__ import annotations

from aiohttp import web

from gateway.hub import Hub
from gateway.identity.apikeys import KeyStore

HUB = web.AppKey("hub", Hub)
KEYS = web.AppKey("keys", KeyStore)
MAX_BODY = web.AppKey("max_body", int)

__all__ = ["HUB", "KEYS", "MAX_BODY"]
