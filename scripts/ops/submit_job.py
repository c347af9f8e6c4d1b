#!/usr/bin/env python
"""Submit an ``asr`` command to a Ray cluster as a Ray Job and follow it (same as ``asr submit``).

    RAY_AUTH_MODE=token python scripts/ops/submit_job.py --address http://127.0.0.1:8265 \\
        -- transcribe /shared/audio --out /shared/out --format txt

Exit code: 0 when the job succeeded, 1 when it failed or was stopped, 2 when it could
not be submitted (see ``pipeline.cluster.jobs``).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cluster.jobs import add_submit_arguments, run_submit


def main(argv: list[str] | None = None) -> int:
    parser = add_submit_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    return run_submit(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
