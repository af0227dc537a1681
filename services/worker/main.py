"""`tandem prefill|decode|worker --role R`: one worker process.

Start-up: bind the request socket and the HTTP server first (a busy port fails before the model
loads; /health answers 503 "starting" meanwhile), load the engine, start the KV block server, print
one `TANDEM_WORKER_READY {json}` line on stdout (addresses with the real ports, for scripts and
`tandem up`), serve. SIGTERM or SIGINT stops it cleanly (exit 0); a failed engine step exits 1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import zmq

from tandem.services.worker.config import WorkerConfig
from tandem.services.worker.kv_engine import KVEngine
from tandem.services.worker.loop import WorkerLoop
from tandem.services.worker.status_http import StatusBoard, start_status_server
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.wire.sockets import MsgRouter

logger = logging.getLogger("tandem.worker")

READY_PREFIX = "TANDEM_WORKER_READY "


def run(config: WorkerConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s [{config.worker_id}] %(name)s: %(message)s")
    ctx = zmq.Context()
    sock = MsgRouter(ctx, config.zmq_addr)
    zmq_port = int(sock.address.rsplit(":", 1)[1])
    board = StatusBoard(config.engine.model or "default")
    http = start_status_server(board, config.host, config.port)
    http_port = http.server_address[1]
    board.status.info = {"worker_id": config.worker_id, "role": config.role, "pid": os.getpid(),
                         "http_port": http_port, "zmq_addr": f"tcp://{config.advertise_host}:{zmq_port}"}
    kv = None
    try:
        try:
            engine = EngineCore(config.engine)
            kv = KVEngine(engine, config.kv, engine_id=config.worker_id)
        except Exception as exc:
            logger.exception("the worker failed to start")
            board.status.dead_reason = f"failed to start: {type(exc).__name__}: {exc}"
            print(f"tandem: error: the worker failed to start: {exc}", file=sys.stderr)
            return 1
        loop = WorkerLoop(kv, sock, board, config.role, config.worker_id)
        info = {**board.status.info, "kv_addr": kv.kv_addr, "model": str(engine.source.path),
                "block_size": engine.kv.block_size, "num_kv_blocks": engine.kv.pool.num_blocks,
                "compat_hash": kv.compat_hash, "kv_transport": config.kv.transport}
        board.status.info = info
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: loop.stop())
        print(READY_PREFIX + json.dumps(info), flush=True)
        logger.info("%s worker ready: requests on %s, KV on %s, HTTP on %s:%d", config.role, info["zmq_addr"],
                    kv.kv_addr, config.host, http_port)
        code = loop.run()
        logger.info("stopped")
        return code
    finally:
        if kv is not None:
            kv.close()
        sock.close()
        ctx.term()
        http.shutdown()
