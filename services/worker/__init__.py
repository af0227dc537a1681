"""Prefill, decode and mixed workers: an engine in a role behind ZeroMQ, with KV transfer."""

# The line a worker prints on stdout once it serves (then its addresses as JSON); read by `tandem up`
# and tests. Here, not in main.py, so that readers need not import pyzmq.
READY_PREFIX = "TANDEM_WORKER_READY "
