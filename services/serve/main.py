"""`tandem serve`: this process runs the OpenAI API (uvicorn, one event loop) and starts the
engine in a child process (multiprocessing spawn) that it talks to over ZeroMQ.

Startup: bind the two sockets (ipc in a private temp folder, or tcp on 127.0.0.1), spawn the
engine, load the tokenizer meanwhile, wait for ReadyMsg, serve. If the engine dies, a watchdog
(the process sentinel on the event loop) fails in-flight requests with a clear error, /health
turns 503, and the server shuts down and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from tandem import __version__
from tandem.services.openai.api import build_app
from tandem.services.openai.engine_client import EngineDeadError, EngineSockets, ZmqEngineClient
from tandem.services.openai.metrics import ServerMetrics
from tandem.services.openai.serving import ServedModel
from tandem.services.serve.engine_process import EngineProcessConfig, run_engine_process
from tandem.shared.config import EngineConfig
from tandem.shared.models.hf_folder import load_tokenizer, resolve_model
from tandem.shared.wire.sockets import ipc_address

logger = logging.getLogger("tandem.serve")

EXIT_ENGINE_DIED = 1


@dataclass(frozen=True)
class ServeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()  # default: the model argument, or the bundled model's name
    api_key: str | None = None
    engine_transport: str = "ipc"  # "ipc" (a private temp folder) or "tcp" (127.0.0.1, free ports)
    engine_start_timeout_s: float = 900.0
    dead_engine_grace_s: float = 2.0  # after the engine dies: time to answer in-flight requests
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.engine_transport not in ("ipc", "tcp"):
            raise ValueError(f"engine_transport: must be 'ipc' or 'tcp', got {self.engine_transport!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be in [0, 65536), got {self.port}")


def default_model_name(config: EngineConfig, source_path: Path) -> str:
    if config.model is not None:
        return config.model
    return source_path.stem.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct


def run(config: ServeConfig) -> int:
    """Serve until shut down; returns the exit code (non-zero if the engine died)."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_serve(config))


async def _serve(config: ServeConfig) -> int:
    source = resolve_model(config.engine.model)  # a bad path fails here, before any process starts
    names = config.served_model_names or (default_model_name(config.engine, source.path),)
    folder = tempfile.mkdtemp(prefix="tandem-serve-")  # mode 0700: only this user reaches the ipc sockets
    if config.engine_transport == "ipc":
        input_addr, output_addr = ipc_address(folder, "engine-in"), ipc_address(folder, "engine-out")
    else:
        input_addr = output_addr = "tcp://127.0.0.1:0"
    sockets = EngineSockets(input_addr, output_addr)
    proc_config = EngineProcessConfig(
        engine=config.engine, input_addr=sockets.input.address, output_addr=sockets.output.address,
        engine_id=f"engine-{uuid.uuid4().hex[:8]}", parent_pid=os.getpid(),
    )
    proc = multiprocessing.get_context("spawn").Process(
        target=run_engine_process, args=(proc_config,), name="tandem-engine", daemon=False,
    )
    proc.start()
    logger.info("engine process %d starting (%s)", proc.pid, sockets.input.address)
    loop = asyncio.get_running_loop()
    client: ZmqEngineClient | None = None
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, source)  # while the engine loads
        metrics = ServerMetrics(names[0])
        client = ZmqEngineClient(sockets, tokenizer, metrics)
        try:
            info = await client.wait_ready(config.engine_start_timeout_s, proc.is_alive)
        except EngineDeadError as exc:
            logger.error("the engine did not start: %s", exc)
            return EXIT_ENGINE_DIED
        logger.info("engine %s ready: max_model_len=%d, %d KV blocks of %d tokens", info.engine_id,
                    info.max_model_len, info.num_kv_blocks, info.block_size)
        model = ServedModel(names, str(source.path), info.max_model_len, info.vocab_size, source.chat_template)
        server: GracefulServer | None = None

        def on_engine_exit() -> None:  # the watchdog: the process sentinel became readable
            loop.remove_reader(proc.sentinel)
            proc.join(0)
            client.mark_dead(f"the engine process died (exit code {proc.exitcode})")
            loop.call_later(config.dead_engine_grace_s, lambda: setattr(server, "should_exit", True))

        @asynccontextmanager
        async def lifespan(app):
            client.start()
            loop.add_reader(proc.sentinel, on_engine_exit)
            try:
                yield
            finally:
                loop.remove_reader(proc.sentinel)
                await client.close()

        app = build_app(client, tokenizer, model, api_key=config.api_key, version=__version__, metrics=metrics,
                        lifespan=lifespan)
        uv_config = uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=5,
        )
        server = GracefulServer(uv_config)
        await server.serve()
        if client.dead_reason is not None:
            return EXIT_ENGINE_DIED
        return 0 if server.started else 1
    finally:
        if client is None:
            proc.terminate()  # interrupted while loading: nobody will send it ShutdownMsg
        elif client.dead_reason is None and proc.is_alive():
            await client.close()
        await asyncio.to_thread(_stop_engine, proc)
        sockets.close()
        shutil.rmtree(folder, ignore_errors=True)


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises a captured SIGINT/SIGTERM once it has shut down, which would kill this
    process before it stops the engine and removes its sockets; here the signal only means
    "shut down gracefully", and `run` returns an exit code."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _stop_engine(proc: multiprocessing.Process) -> None:
    """After ShutdownMsg the engine exits by itself; terminate it if it does not."""
    proc.join(10)
    if proc.is_alive():
        logger.warning("engine process %d did not exit: terminating it", proc.pid)
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()


def config_from_args(args, env: dict[str, str]) -> ServeConfig:
    """The one place argv (tandem.cli's parser) and the environment become a ServeConfig."""
    from tandem.shared.config import parse_bytes

    model = args.model_tag if args.model_tag is not None else args.model
    engine = EngineConfig(
        model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        block_size=args.block_size, enable_prefix_caching=not args.no_enable_prefix_caching,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=parse_bytes(args.kv_cache_memory), gpu_memory_utilization=args.gpu_memory_utilization,
        load_format=args.load_format, enforce_eager=args.enforce_eager,
    )
    return ServeConfig(
        engine=engine, host=args.host, port=args.port, served_model_names=tuple(args.served_model_name or ()),
        api_key=args.api_key or env.get("TANDEM_API_KEY") or None, engine_transport=args.engine_transport,
        log_level=args.log_level,
    )
