"""The policy engine: Rego evaluated in-process by regorus, behind ``evaluate``.

Parts:

- ``engine``: ``RegorusPolicy`` (``evaluate(query, input) -> Decision``), failing closed on
  any error, undefined decision or non-boolean ``allow``;
- ``testing``: the ``opa test``-like runner for ``*_test.rego`` files.
"""

from gateway.policy.engine import (
    API_QUERY,
    DISPATCH_QUERY,
    MESSAGES_QUERY,
    Decision,
    PolicyEngine,
    RegorusPolicy,
)
from gateway.policy.testing import TestReport, run_tests

__all__ = [
    "API_QUERY",
    "DISPATCH_QUERY",
    "MESSAGES_QUERY",
    "Decision",
    "PolicyEngine",
    "RegorusPolicy",
    "TestReport",
    "run_tests",
]
