"""The agent-side SDK: a few lines turn a function into an agent the hub can run.

Standard library only, so agent images need nothing but Python.
"""

from gateway.sdk.agent import Agent, AgentError, TaskContext
from gateway.sdk.client import GatewayClient, HubError

__all__ = ["Agent", "AgentError", "GatewayClient", "HubError", "TaskContext"]
