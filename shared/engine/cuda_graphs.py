"""CUDA graphs for the runner's Triton path: one graph per padded layout, captured once at start.

- Decode graphs: B single-token sequences (B in 1, 2, 4, 8, 16, ... max_num_seqs), no prefill.
- Mixed graphs: T tokens (64 ... 2048) with up to T decode entries and a few prefill chunks, so
  that steps which admit a short prompt among running decodes are not host-bound either.

Each graph runs embedding -> layers -> final norm -> logits of the sampled rows into one static
fp32 logits buffer. The step's inputs are copied into StepInputs' static buffers before the replay.
A step that fits no graph, or needs hidden states (prompt logprobs), runs eagerly.

Without CUDA (tests under TRITON_INTERPRET=1) `capture=False` keeps the same padding logic and
runs the padded forward eagerly, so the padding is tested where graphs cannot be captured.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from tandem.shared.engine.step_inputs import Layout, max_tiles

logger = logging.getLogger(__name__)

MIXED_TOKEN_SIZES = (64, 128, 256, 512, 768, 1024, 1536, 2048)
MIXED_MAX_PREFILLS = 8  # prompt chunks a mixed graph takes in one step


def decode_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def graph_layouts(max_num_seqs: int, max_tokens: int) -> list[Layout]:
    """Decode layouts, then mixed layouts, each family in increasing size."""
    layouts = [Layout(b, b, 0, 0, b) for b in decode_sizes(max_num_seqs)]
    for t in MIXED_TOKEN_SIZES:
        if t > max_tokens:
            break
        seqs = min(t, max_num_seqs)
        prefills = min(MIXED_MAX_PREFILLS, t // 2)
        layouts.append(Layout(t, seqs, prefills, max_tiles(t, prefills), seqs))
    return layouts


class CudaGraphs:
    """`forward(layout, logits_out)` runs one padded forward over the static inputs and writes the
    sampled rows' logits into logits_out [S, vocab] (fp32)."""

    def __init__(self, forward: Callable[[Layout, torch.Tensor], None], layouts: list[Layout],
                 logits_buffer: torch.Tensor, upload_padding: Callable[[Layout], None], capture: bool) -> None:
        self.forward = forward
        self.layouts = sorted(set(layouts), key=_cost)
        self._decode = [layout for layout in self.layouts if layout.num_prefill == 0]  # by size
        self._decode_sizes = [layout.num_decode for layout in self._decode]
        self._mixed = [layout for layout in self.layouts if layout.num_prefill]
        self.logits = logits_buffer  # [max_sample, vocab] fp32
        self.capture_enabled = capture
        self.graphs: dict[Layout, torch.cuda.CUDAGraph] = {}
        self._upload_padding = upload_padding

    def pick(self, exact: Layout) -> Layout | None:
        """The smallest layout that fits the step: a decode graph for a decode-only step."""
        if exact.num_prefill == 0:
            i = bisect.bisect_left(self._decode_sizes, exact.num_decode)
            if i < len(self._decode_sizes):
                layout = self._decode[i]
                if layout.fits(exact):
                    return layout
        return next((layout for layout in self._mixed if layout.fits(exact)), None)

    def capture(self) -> None:
        """Capture every layout, largest first (smaller graphs reuse the shared pool's memory)."""
        if not self.capture_enabled:
            return
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for layout in sorted(self.layouts, key=_cost, reverse=True):
            self._upload_padding(layout)  # every entry padding: valid inputs, nothing stored
            out = self.logits[: layout.num_sample]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(layout, out)  # warm-up: compiles kernels, creates library handles
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.forward(layout, out)
            self.graphs[layout] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - t0)

    def run(self, layout: Layout) -> torch.Tensor:
        """Replay (or, without capture, run eagerly) the layout; returns logits [S_padded, vocab]."""
        out = self.logits[: layout.num_sample]
        graph = self.graphs.get(layout)
        if graph is not None:
            graph.replay()
        else:
            self.forward(layout, out)
        return out


def _cost(layout: Layout) -> tuple[int, int]:
    return layout.num_tokens, layout.num_tiles
