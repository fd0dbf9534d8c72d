"""Quotas and rate limits, declared in ``limits.yaml`` and checked before any policy.

Parts:

- ``model``: the limits file (``Limits``, ``SubjectLimits``, ``InstanceLimits``, ``Rate``)
  and its loader, validated against ``schemas/limits.schema.json`` with file:line errors;
- ``buckets``: token buckets keyed by (limit, caller), forgotten once full again;
- ``limiter``: the checks the doors run (``Limiter``), raising ``TooManyRequests`` with
  ``Retry-After`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` fields.
"""

from gateway.limits.buckets import BucketTable, Take, TokenBucket
from gateway.limits.limiter import QUOTA_RETRY_AFTER_S, Limiter, caller_key
from gateway.limits.model import (
    LIMITS_SCHEMA,
    NO_LIMITS,
    InstanceLimits,
    Limits,
    Rate,
    SubjectLimits,
    load_limits,
)

__all__ = [
    "LIMITS_SCHEMA",
    "NO_LIMITS",
    "QUOTA_RETRY_AFTER_S",
    "BucketTable",
    "InstanceLimits",
    "Limiter",
    "Limits",
    "Rate",
    "SubjectLimits",
    "Take",
    "TokenBucket",
    "caller_key",
    "load_limits",
]
