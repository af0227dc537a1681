"""The `tandem` command line: `generate` prints what LLM.generate returns; bad input exits
non-zero with a message naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tandem import SamplingParams
from tandem.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def test_generate_prints_llm_output(request):
    cmd = [sys.executable, "-m", "tandem.cli", "generate", PROMPT, "--max-tokens", "8", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # loaded (if not yet) and run while the subprocess loads its own copy
        smollm2 = request.getfixturevalue("smollm2")
        expected = smollm2.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    assert expected.strip()
    assert stdout == expected + "\n"


def test_bad_max_tokens(capsys):
    assert main(["generate", PROMPT, "--max-tokens", "-1", "--dtype", "float32"]) != 0
    err = capsys.readouterr().err
    assert "max_tokens" in err and "-1" in err


def test_bad_temperature(capsys):
    assert main(["generate", PROMPT, "--temperature", "-2"]) != 0
    assert "temperature" in capsys.readouterr().err


def test_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", PROMPT, "--model", str(missing), "--max-tokens", "4"]) != 0
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_unparsable_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--max-tokens", "many"])
    assert e.value.code != 0
    assert "--max-tokens" in capsys.readouterr().err


def test_enforce_eager_reaches_the_runner(tiny_models, monkeypatch):
    """--enforce-eager (EngineConfig.enforce_eager, LLM(enforce_eager=True)) asks the runner for no
    CUDA graphs; the default leaves the choice to the runner (graphs on CUDA)."""
    import argparse

    from tandem.cli import add_engine_args, engine_kwargs
    from tandem.shared.config import EngineConfig
    from tandem.shared.engine import engine_core

    seen = []

    class Spy(engine_core.ModelRunner):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("cuda_graphs"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_core, "ModelRunner", Spy)
    p = argparse.ArgumentParser()
    add_engine_args(p)
    folder = str(tiny_models["llama"][0])
    for argv, want in ((["--enforce-eager"], False), ([], None)):
        kwargs = {**engine_kwargs(p.parse_args(["--model", folder, *argv])), "kv_cache_memory": 1 << 24}
        assert kwargs["enforce_eager"] is (want is False)
        engine_core.EngineCore(EngineConfig(model=folder, **kwargs))
        assert seen[-1] is want
