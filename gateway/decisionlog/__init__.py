"""The decision log: one hash-chained record per policy decision, in OPA's shape.

Parts:

- ``records``: the record type, its canonical bytes and the chain hash (pure);
- ``masking``: erase or redact input fields by JSON pointer before logging (pure);
- ``verify``: recompute the chain and name each edited, deleted, inserted or reordered
  record (pure);
- ``log``: ``DecisionLog``, which masks, chains and appends through the store;
- ``replay``: re-evaluate logged inputs under another policy revision.
"""

from gateway.decisionlog.log import DecisionLog, row_to_json
from gateway.decisionlog.masking import REDACTED, Masker, parse_mask_rule, pointers_marked_secret
from gateway.decisionlog.records import (
    GENESIS_HASH,
    ChainBuilder,
    DecisionRecord,
    canonical_bytes,
    chain_hash,
    now_rfc3339,
    record_from_row,
    record_to_json,
)
from gateway.decisionlog.verify import VerifyReport, verify_chain

__all__ = [
    "GENESIS_HASH",
    "REDACTED",
    "ChainBuilder",
    "DecisionLog",
    "DecisionRecord",
    "Masker",
    "VerifyReport",
    "canonical_bytes",
    "chain_hash",
    "now_rfc3339",
    "parse_mask_rule",
    "pointers_marked_secret",
    "record_from_row",
    "record_to_json",
    "row_to_json",
    "verify_chain",
]
