"""The one error type of KV transfer, with a machine-readable reason code."""

from __future__ import annotations

# Reason codes; they cross the wire in KVErrorMsg.code.
REASONS = frozenset({
    "compat_mismatch",  # the peers' compat hashes differ (model, dtype, block size, layout, version)
    "lease_expired",  # the lease existed but expired; its blocks may be reused
    "unknown_lease",  # no such lease on the serving worker
    "bad_block",  # a block id or layer out of range, duplicated, or not covered by the lease
    "bad_message",  # a header that does not decode, or sizes and counts that do not match
    "timeout",  # no answer in time
    "peer_gone",  # no connection to the serving worker
    "internal_error",  # a bug on the serving side; the server keeps serving
})


class KVTransferError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        if code not in REASONS:
            code = "bad_message"
        super().__init__(f"{code}: {message}")
        self.code = code
        self.reason = message
