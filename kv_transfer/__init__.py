"""KV-block transfer between a prefill and a decode worker (pull model).

`connector` is the policy (what to move, leases, failure policy) over one transport interface
(`transport`) with two transports: ZeroMQ (`zmq_transport`, needs pyzmq) and UCX
(`ucx_transport`, needs the optional `ucxx`). Importing this package imports neither.
"""
