"""`tandem router [MODEL]`: the OpenAI API over the cluster registered in Redis.

Start-up: load the tokenizer of MODEL (the workers' model), start the Redis sync, wait until a
worker is alive and has said who it is (max_model_len, vocabulary), then serve: the same FastAPI
app as `tandem serve` (services/openai), with ClusterEngineClient as its engine client. /metrics
adds the cluster's view: workers alive per role, requests routed per worker, failovers, and the
workers' prefix-cache counters summed (tandem:prefix_cache_queries / _hits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import uvicorn
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem import __version__
from tandem.services.openai.api import build_app
from tandem.services.openai.metrics import ServerMetrics
from tandem.services.openai.serving import ServedModel
from tandem.services.router.dispatcher import ClusterEngineClient
from tandem.services.router.placement import POLICIES, Placement
from tandem.services.router.redis_sync import RedisSync
from tandem.services.router.state import ClusterView
from tandem.services.serve.main import GracefulServer, default_model_name
from tandem.shared.config import EngineConfig
from tandem.shared.models.hf_folder import load_tokenizer, resolve_model

logger = logging.getLogger("tandem.router")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RouterConfig:
    model: str | None
    redis_url: str = DEFAULT_REDIS_URL
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "cache_aware"
    prefill_weight: float = 4.0
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    worker_wait_s: float = 900.0  # at start-up: how long to wait for a first worker
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65536), got {self.port}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")


class ClusterCollector:
    """The router's own view of the cluster, for /metrics."""

    def __init__(self, model_name: str, view: ClusterView, client: ClusterEngineClient, sync: RedisSync) -> None:
        self.model_name = model_name
        self.view = view
        self.client = client
        self.sync = sync

    def describe(self):
        return []

    def collect(self):
        alive = GaugeMetricFamily("tandem:router_workers_alive", "Workers in the pool, by role.",
                                  labels=["model_name", "role"])
        for role in ("prefill", "decode", "mixed"):
            alive.add_metric([self.model_name, role], len(self.view.alive((role,))))
        yield alive
        routed = CounterMetricFamily("tandem:router_requests_routed", "Requests this router sent each worker.",
                                     labels=["model_name", "worker_id", "role"])
        for w in self.view.workers.values():
            routed.add_metric([self.model_name, w.worker_id, w.record.role], w.routed)
        yield routed
        failovers = CounterMetricFamily("tandem:router_failovers", "Sequences sent to another worker after theirs "
                                        "was lost.", labels=["model_name"])
        failovers.add_metric([self.model_name], self.client.num_failovers)
        yield failovers
        errors = CounterMetricFamily("tandem:router_redis_errors", "Failed Redis syncs.", labels=["model_name"])
        errors.add_metric([self.model_name], self.sync.num_errors)
        yield errors
        index = GaugeMetricFamily("tandem:router_prefix_index_blocks", "Block hashes in the prefix index.",
                                  labels=["model_name"])
        index.add_metric([self.model_name], self.view.index_size)
        yield index


def run(config: RouterConfig) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s [router] %(name)s: %(message)s")
    return asyncio.run(_serve(config))


async def _serve(config: RouterConfig) -> int:
    source = resolve_model(config.model, require_weights=False)
    names = config.served_model_names or (default_model_name(EngineConfig(model=config.model), source.path),)
    tokenizer = await asyncio.to_thread(load_tokenizer, source)
    metrics = ServerMetrics(names[0])
    view = ClusterView()
    client = ClusterEngineClient(view, Placement(config.policy, view, config.prefill_weight), tokenizer, metrics)
    sync = RedisSync(config.redis_url, view, client)
    sync_task = asyncio.create_task(sync.run(), name="redis-sync")
    try:
        logger.info("waiting for workers registered in %s", config.redis_url)
        await asyncio.wait_for(_first_model_info(client, sync), config.worker_wait_s)
        info = client.model_info
        logger.info("cluster model: max_model_len=%d, blocks of %d tokens; policy %s", info.max_model_len,
                    info.block_size, config.policy)
        model = ServedModel(names, str(source.path), info.max_model_len, info.vocab_size, source.chat_template)
        metrics.registry.register(ClusterCollector(names[0], view, client, sync))

        app = build_app(client, tokenizer, model, api_key=config.api_key, version=__version__, metrics=metrics)
        server = GracefulServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                        timeout_graceful_shutdown=5))
        await server.serve()
        return 0 if server.started else 1
    except TimeoutError:
        logger.error("no worker registered in %s within %.0f s", config.redis_url, config.worker_wait_s)
        return 1
    finally:
        sync_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sync_task
        await client.close()
        await sync.close()


async def _first_model_info(client: ClusterEngineClient, sync: RedisSync) -> None:
    while client.model_info is None:
        await sync.first_worker.wait()
        for worker in sync.view.alive():
            try:
                await client.hello(worker)
                break
            except Exception as exc:  # not reachable yet: the next one, or again shortly
                logger.info("worker %s did not answer yet: %s", worker.worker_id, exc)
        await asyncio.sleep(0.2)


def config_from_args(args, env: Mapping[str, str]) -> RouterConfig:
    model = args.model_tag if args.model_tag is not None else args.model
    return RouterConfig(
        model=model, redis_url=args.redis_url or env.get("TANDEM_REDIS_URL") or DEFAULT_REDIS_URL,
        host=args.host, port=args.port, policy=args.policy, prefill_weight=args.prefill_weight,
        served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or env.get("TANDEM_API_KEY") or None, log_level=args.log_level,
    )
