"""The ``llm-telemetry`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-telemetry", description="LLM-aware telemetry for ASGI services.")
    parser.add_argument("--version", action="version", version=f"llm-telemetry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the demo LLM service, drive it with the openai SDK, print a summary")
    demo.add_argument("--host", default="127.0.0.1", help="address of the demo service (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port of the demo service (default 8000)")
    demo.add_argument("--metrics-port", type=int, default=9464, help="port of the metrics endpoint (default 9464)")
    demo.add_argument("--requests", type=int, default=40, help="chat requests to send (default 40)")
    demo.add_argument("--serve", action="store_true", help="keep serving after the summary, until Ctrl-C")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo.run import run_demo

        return run_demo(args.host, args.port, args.metrics_port, args.requests, args.serve)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
