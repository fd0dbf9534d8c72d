"""Several hubs, one state: membership, task leases and takeover, singletons.

Parts:

- ``membership``: ``Membership``, one hub's heartbeat loop over the store's cluster tables
  (``gateway.store.pg_cluster``): leases renewed, singletons held, expired tasks taken over,
  the other hubs' keys and instances learnt.
"""

from gateway.cluster.membership import SINGLETONS, ClusterHooks, ClusterTables, Membership

__all__ = ["SINGLETONS", "ClusterHooks", "ClusterTables", "Membership"]
