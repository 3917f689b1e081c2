"""Run one benchmark variant under uvicorn (uvloop, httptools), pinned to one core.

Usage: ``python benchmarks/serve.py --variant ours --port 8001 [--cpu 0] [--workers 2] [--profile out.prof]``.
The variant's settings come from the ``BENCH_*`` environment variables described in ``apps.py``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None, help="pin the server (and its workers) to this core")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--profile", default=None, help="write cProfile stats here on exit (one worker only)")
    args = parser.parse_args(argv)

    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})  # inherited by uvicorn's worker processes
    os.environ["BENCH_VARIANT"] = args.variant
    sys.path.insert(0, str(HERE))

    import uvicorn

    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": args.port,
        "loop": "uvloop",
        "http": "httptools",
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
        "factory": True,
        "app_dir": str(HERE),
    }
    if args.workers > 1:
        uvicorn.run("apps:from_env", workers=args.workers, **options)
        return 0
    if args.profile is None:
        uvicorn.run("apps:from_env", **options)
        return 0

    import cProfile

    profiler = cProfile.Profile()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    profiler.enable()
    try:
        uvicorn.run("apps:from_env", **options)
    except KeyboardInterrupt:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
