"""Command line: ``stream-server`` serves; ``stream-server bench ...`` runs the benchmark suite."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from stream_server import settings as settings_mod


def main(argv: Sequence[str] | None = None) -> int:
    # numpy's BLAS serves only small matrix products here (mel filters); its idle worker threads
    # spun on 10-14 of 16 cores in a GPU run for no speed-up, taking cores from the decoder.
    # Set before numpy is imported; an explicit setting by the operator wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from stream_server.bench.__main__ import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="stream-server",
        description="Real-time streaming speech-to-text server (WebSocket /v1/stream, OpenAI-compatible HTTP). "
        "Runs offline on the bundled Whisper tiny.en by default. 'stream-server bench --help' for the benchmark.",
    )
    settings_mod.add_arguments(parser)
    settings = settings_mod.from_sources(parser.parse_args(argv))
    from stream_server.server import serve

    serve(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
