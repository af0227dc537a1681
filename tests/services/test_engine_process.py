"""The engine process over its sockets, driven with wire messages (tiny random model, token
ids only): outputs equal the offline LLM's; a bad message or a bad request gets an ErrorMsg and
the engine keeps serving; aborts free blocks; it exits on ShutdownMsg and when its parent dies."""

from __future__ import annotations

import multiprocessing
import os

import pytest

zmq = pytest.importorskip("zmq")

from tandem import LLM, SamplingParams  # noqa: E402
from tandem.services.serve.engine_process import EngineProcessConfig, run_engine_process  # noqa: E402
from tandem.shared.config import EngineConfig  # noqa: E402
from tandem.shared.wire.messages import (  # noqa: E402
    AbortMsg,
    AddRequestMsg,
    EngineOutputsMsg,
    ErrorMsg,
    ReadyMsg,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    params_to_wire,
)
from tandem.shared.wire.sockets import MsgPull, MsgPush, ipc_address  # noqa: E402
from tests.conftest import save_tiny_model, track  # noqa: E402

ENGINE = dict(dtype="float32", block_size=4, num_kv_blocks=64, max_model_len=64)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-proc") / "llama"
    save_tiny_model("llama", folder)
    return folder


class Engine:
    def __init__(self, folder, tmp_path, parent_pid: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.input = MsgPush(self.ctx, ipc_address(str(tmp_path), "in"), bind=True)
        self.output = MsgPull(self.ctx, ipc_address(str(tmp_path), "out"), bind=True)
        config = EngineProcessConfig(
            EngineConfig(model=str(folder), **ENGINE), self.input.address, self.output.address, "test-engine",
            parent_pid=os.getpid() if parent_pid is None else parent_pid, stats_interval_s=0,
        )
        self.proc = multiprocessing.get_context("spawn").Process(target=run_engine_process, args=(config,))
        self.proc.start()
        self.ready = self.recv(timeout_s=120)

    def recv(self, timeout_s: float = 30):
        assert self.output.poll(int(timeout_s * 1000)), "no message from the engine"
        return self.output.recv()

    def run(self, request_id: str, prompt: list[int], params: SamplingParams) -> dict[str, list[int]]:
        self.input.send(AddRequestMsg(request_id, prompt, params_to_wire(params)))
        tokens: dict[str, list[int]] = {}
        finished: set[str] = set()
        while len(finished) < params.n:
            msg = self.recv()
            assert isinstance(msg, EngineOutputsMsg), msg
            for out in msg.outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finished.add(out.request_id)
        return tokens

    def stats(self) -> StatsMsg:
        self.input.send(StatsRequestMsg(7))
        while not isinstance(msg := self.recv(), StatsMsg):
            pass
        assert msg.request_seq == 7
        return msg

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.input.close()
        self.output.close()
        self.ctx.term()


def test_engine_process(tiny_folder, tmp_path):
    engine = Engine(tiny_folder, tmp_path)
    try:
        ready = engine.ready
        assert isinstance(ready, ReadyMsg)
        assert (ready.max_model_len, ready.block_size, ready.num_kv_blocks) == (64, 4, 64)
        assert ready.pid == engine.proc.pid

        offline = track(LLM(str(tiny_folder), skip_tokenizer_init=True, **ENGINE))
        prompt = [11, 42, 7, 99, 3, 250]
        params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)
        expected = [c.token_ids for c in offline.generate({"prompt_token_ids": prompt}, params)[0].outputs]
        got = engine.run("a", prompt, params)
        assert [got["a#0"], got["a#1"]] == expected

        # A message that does not decode: an ErrorMsg, and the engine goes on.
        engine.input.socket.send_multipart([b"\x93\x01"])
        err = engine.recv()
        assert isinstance(err, ErrorMsg) and err.request_id is None and err.code == 400
        assert "bad message" in err.message

        engine.input.send(AddRequestMsg("bad", prompt, {"temperature": -1.0}))
        err = engine.recv()
        assert (err.request_id, err.code, err.param) == ("bad", 400, "temperature")
        engine.input.send(AddRequestMsg("oov", [ready.vocab_size + 5], {}))
        err = engine.recv()
        assert (err.request_id, err.code, err.param) == ("oov", 400, "prompt")
        engine.input.send(AddRequestMsg("long", [1] * 64, {}))
        err = engine.recv()
        assert err.param == "prompt" and "64" in err.message

        greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        expected = offline.generate({"prompt_token_ids": prompt}, greedy)[0].outputs[0].token_ids
        assert engine.run("b", prompt, greedy)["b"] == expected

        # Abort mid-generation frees the request's blocks.
        engine.input.send(AddRequestMsg("c", prompt, params_to_wire(SamplingParams(max_tokens=50, ignore_eos=True))))
        first = engine.recv()
        assert isinstance(first, EngineOutputsMsg) and first.outputs[0].finish_reason is None
        engine.input.send(AbortMsg(["c"]))
        stats = engine.stats()
        assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)
        assert stats.num_total_blocks == 64 and stats.prompt_tokens > 0

        engine.input.send(ShutdownMsg("test"))
        engine.proc.join(30)
        assert engine.proc.exitcode == 0
    finally:
        engine.close()


def test_engine_exits_when_its_parent_is_gone(tiny_folder, tmp_path):
    engine = Engine(tiny_folder, tmp_path, parent_pid=os.getpid() + 10**6)  # not its parent: "parent died"
    try:
        assert isinstance(engine.ready, ReadyMsg)
        engine.proc.join(30)
        assert engine.proc.exitcode == 0
    finally:
        engine.close()
