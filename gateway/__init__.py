"""agent-gateway: a declarative, policy-first gateway for AI agents in containers.

Kept free of imports so that agent images can ship ``gateway.sdk`` alone.
"""

__version__ = "0.1.0"
