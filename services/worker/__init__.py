"""Prefill, decode and mixed workers: an engine in a role behind ZeroMQ, with KV transfer."""
