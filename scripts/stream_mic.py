#!/usr/bin/env python
"""Live speech recognition from a microphone (or a WAV file) through the Ray streaming pipeline.

    python scripts/stream_mic.py                          # default input device, Ctrl-C to stop
    python scripts/stream_mic.py --list-devices
    python scripts/stream_mic.py --device 2 --decoder greedy --endpoint-ms 800
    python scripts/stream_mic.py --file utterance.wav     # paced in real time; --fast for unpaced

Final results print as ``[start_s - end_s] text``; the partial shows as a live line on a
terminal. Same code as ``asr stream`` (``pipeline.streaming.run_stream``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.streaming import add_stream_arguments, run_stream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_stream_arguments(parser, config_options=True)
    return run_stream(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
