"""The decision log: one hash-chained record per policy decision, in OPA's shape.

Parts:

- ``records``: the record type, its canonical bytes, the chain hash, ``seal_record`` (the
  one function that extends a chain) and the stored form of a record (pure);
- ``masking``: erase or redact input fields by JSON pointer before logging (pure);
- ``verify``: recompute the chain and name each edited, deleted, inserted or reordered
  record, and a tail cut against an expected count or head (pure);
- ``checkpoint``: what a prune leaves in place of the records it removed, and the hub's
  head witness; ``verify_log`` proves a pruned log, ``verify_export`` an export (pure);
- ``prune``: the export file a prune writes, durably, before deleting anything;
- ``log``: ``DecisionLog``, which masks, seals and appends through the store
  (``gateway.store`` holds the SQL);
- ``replay``: re-evaluate logged inputs under another policy revision.

The ``agent-gateway decisions`` command (arguments, printing, exit status) is in
``gateway.cli``.
"""

from gateway.decisionlog.checkpoint import (
    UnknownCheckpoint,
    check_checkpoints,
    seal_checkpoint,
    verify_export,
    verify_log,
)
from gateway.decisionlog.log import DecisionLog
from gateway.decisionlog.masking import REDACTED, Masker, parse_mask_rule, pointers_marked_secret
from gateway.decisionlog.prune import PruneError
from gateway.decisionlog.records import (
    GENESIS_HASH,
    ChainBuilder,
    DecisionRecord,
    canonical_bytes,
    chain_hash,
    now_rfc3339,
    record_from_row,
    record_to_json,
    record_to_row,
    row_to_json,
    seal_record,
)
from gateway.decisionlog.verify import PROBLEM_KINDS, VerifyReport, verify_chain

__all__ = [
    "GENESIS_HASH",
    "PROBLEM_KINDS",
    "REDACTED",
    "ChainBuilder",
    "DecisionLog",
    "DecisionRecord",
    "Masker",
    "PruneError",
    "UnknownCheckpoint",
    "VerifyReport",
    "canonical_bytes",
    "chain_hash",
    "check_checkpoints",
    "now_rfc3339",
    "parse_mask_rule",
    "pointers_marked_secret",
    "record_from_row",
    "record_to_json",
    "record_to_row",
    "row_to_json",
    "seal_checkpoint",
    "seal_record",
    "verify_chain",
    "verify_export",
    "verify_log",
]
