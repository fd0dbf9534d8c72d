"""Running agent instances and the clients that talk to them.

Parts:

- ``base``: the reply types (``Accepted``, ``AgentReplyError``) and the transport contract;
- ``http``: ``AgentClient``: readiness probes and task hand-offs, over ``AgentWire``;
- ``wire``: ``AgentWire``, a lean keep-alive HTTP/1.1 client for hand-offs, messages, probes;
- ``instances``: the containers the hub runs now, their identities and lineage.
"""

from gateway.agents.base import MAX_REPLY_BYTES, Accepted, AgentReplyError, AgentTransport
from gateway.agents.http import AgentClient
from gateway.agents.instances import Instance, InstanceRegistry, LineageEntry
from gateway.agents.wire import AgentWire

__all__ = [
    "MAX_REPLY_BYTES",
    "Accepted",
    "AgentClient",
    "AgentReplyError",
    "AgentTransport",
    "AgentWire",
    "Instance",
    "InstanceRegistry",
    "LineageEntry",
]
