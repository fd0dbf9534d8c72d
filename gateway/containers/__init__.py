"""Where agents run: the container backend interface and its implementations.

Parts:

- ``backend``: the interface (``ContainerBackend``), ``ContainerSpec``, ``ContainerHandle``
  and the labels every managed container carries;
- ``docker``: ``DockerBackend``, the local Docker engine through docker-py in a thread pool;
  it refuses networks with the wrong flags and never runs a container as root;
- ``swarm``: ``SwarmBackend``, one Swarm service per agent on an internal encrypted overlay;
  a guardrail a service cannot carry is refused unless the sandbox accepts its equivalent;
- ``firewall``: the host's iptables rules that let agent networks reach the hub's agent
  port and no other service of the host;
- ``guardrails``: a policy decision's sandbox turned into a container spec, refusing what it
  cannot enforce (``build_spec``);
- ``images``: building the example agents' images.
"""

from gateway.containers.backend import ContainerBackend, ContainerHandle, ContainerSpec
from gateway.containers.guardrails import build_spec

__all__ = ["ContainerBackend", "ContainerHandle", "ContainerSpec", "build_spec"]
