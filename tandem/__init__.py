"""Tandem: an LLM inference and serving engine.

`from tandem import LLM, SamplingParams` needs only torch, transformers, safetensors, numpy,
msgpack, gguf and tqdm; the services import their own dependencies.
"""

from tandem.shared.engine.llm import LLM
from tandem.shared.outputs import CompletionOutput, RequestOutput
from tandem.shared.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
