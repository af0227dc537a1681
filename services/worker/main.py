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
import time
from typing import TYPE_CHECKING

import zmq

from tandem.services.worker import READY_PREFIX
from tandem.services.worker.config import WorkerConfig
from tandem.services.worker.kv_engine import KVEngine
from tandem.services.worker.loop import WorkerLoop
from tandem.services.worker.status_http import StatusBoard, start_status_server
from tandem.shared.cluster import WorkerRecord
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.wire.sockets import MsgRouter

if TYPE_CHECKING:  # redis (the router extra) is imported only when a Redis URL is given
    from tandem.services.worker.redis_agent import RedisAgent

logger = logging.getLogger("tandem.worker")


def run(config: WorkerConfig) -> int:
    sys.setswitchinterval(config.switch_interval_ms / 1000)
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
    agent = None
    try:
        try:
            engine = EngineCore(config.engine)
            kv = KVEngine(engine, config.kv, engine_id=config.worker_id)
            info = {**board.status.info, "kv_addr": kv.kv_addr, "model": str(engine.source.path),
                    "block_size": engine.kv.block_size, "num_kv_blocks": engine.kv.pool.num_blocks,
                    "compat_hash": kv.compat_hash, "kv_transport": config.kv.transport}
            if config.redis_url:
                agent = _start_redis_agent(config, engine, info, board)
        except Exception as exc:
            logger.exception("the worker failed to start")
            board.status.dead_reason = f"failed to start: {type(exc).__name__}: {exc}"
            print(f"tandem: error: the worker failed to start: {exc}", file=sys.stderr)
            return 1
        board.status.info = info
        loop = WorkerLoop(kv, sock, board, config.role, config.worker_id, agent)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: loop.stop())
        print(READY_PREFIX + json.dumps(info), flush=True)
        logger.info("%s worker ready: requests on %s, KV on %s, HTTP on %s:%d", config.role, info["zmq_addr"],
                    kv.kv_addr, config.host, http_port)
        code = loop.run()
        logger.info("stopped")
        return code
    finally:
        if agent is not None:
            agent.stop()
        if kv is not None:
            kv.close()
        sock.close()
        ctx.term()
        http.shutdown()


def _start_redis_agent(config: WorkerConfig, engine: EngineCore, info: dict, board: StatusBoard) -> RedisAgent:
    """Register in Redis (on the agent's thread: a Redis that is down only delays it); the pool
    records KV events from now on, and the first heartbeat carries the (empty) cache as a reset."""
    from tandem.services.worker.redis_agent import RedisAgent, RedisAgentCollector

    mc = engine.model_config
    record = WorkerRecord(
        worker_id=config.worker_id, role=config.role, model=str(engine.source.path), zmq_addr=info["zmq_addr"],
        kv_addr=info["kv_addr"], http_addr=f"http://{config.advertise_host}:{info['http_port']}",
        block_size=engine.kv.block_size, compat_hash=info["compat_hash"], max_model_len=mc.max_model_len,
        epoch=time.time_ns(),
    )
    agent = RedisAgent(config.redis_url, record)
    pool = engine.kv.pool
    pool.events = []
    agent.offer_snapshot(pool.cached_hashes())
    board.registry.register(RedisAgentCollector(board.engine_collector.model_name, agent))
    agent.start()
    return agent
