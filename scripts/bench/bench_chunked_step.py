"""Time one training step (forward + backward) of the default-size model, chunked two ways.

``forward`` runs all latency-controlled windows of a batch at once;
``forward_windows_sequential`` runs one window at a time, as a stream does (and as
training did before). Usage: python scripts/bench/bench_chunked_step.py [THREADS]
"""

from __future__ import annotations

import sys
import time

import torch

from workers.model.bilstm import BiLSTMCTC, ModelConfig


def step_s(model: BiLSTMCTC, path: str, x: torch.Tensor, lengths: torch.Tensor, chunk: int | None, rc: int) -> float:
    """Fastest of 3 forward+backward passes, in seconds."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        getattr(model, path)(x, lengths, chunk, rc).sum().backward()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    torch.manual_seed(0)
    model = BiLSTMCTC(ModelConfig())
    x, lengths = torch.randn(8, 300, 120), torch.full((8,), 300)
    print(f"batch 8 x 300 frames, {torch.get_num_threads()} threads")
    print(f"whole utterance: {step_s(model, 'forward', x, lengths, None, 0):.2f} s")
    for chunk, rc in [(4, 2), (12, 6), (20, 10)]:
        batched = step_s(model, "forward", x, lengths, chunk, rc)
        sequential = step_s(model, "forward_windows_sequential", x, lengths, chunk, rc)
        print(f"chunk {chunk} + lookahead {rc} frames: all windows at once {batched:.2f} s, one at a time {sequential:.2f} s")


if __name__ == "__main__":
    main()
