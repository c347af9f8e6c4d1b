"""PSS of the streaming pipeline with one idle stream (``pipeline.bench.stream_memory``): the torch-free
driver and every Ray process it started. `asr bench` reports the same figure
(``idle_stream_memory``) among its others; this runs that part alone, in about a minute:

    OMP_NUM_THREADS=1 python scripts/bench/streaming_memory.py ../shared/data/an4 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.bench.stream_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
