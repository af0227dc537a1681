#!/bin/sh
# The image's entrypoint (under tini): sets the address a worker advertises to the router and to its
# peers, then runs the command (e.g. `tandem prefill ...`).
# Kubernetes sets TANDEM_ADVERTISE_HOST from the pod IP (downward API). Under compose it is unset, and a
# service may run several replicas behind one DNS name, so each container advertises its own IP: the one its
# hostname resolves to (Docker writes it in /etc/hosts), else the source address of the default route.
set -eu
if [ -z "${TANDEM_ADVERTISE_HOST:-}" ]; then
    TANDEM_ADVERTISE_HOST="$(python3 - <<'PY'
import socket

ip = socket.gethostbyname(socket.gethostname())
if ip.startswith("127."):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # UDP connect: picks the route, sends nothing
        ip = probe.getsockname()[0]
    except OSError:
        pass
    finally:
        probe.close()
print(ip)
PY
)"
    export TANDEM_ADVERTISE_HOST
fi
exec "$@"
