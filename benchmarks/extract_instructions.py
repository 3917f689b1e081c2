"""The instructions the tracing pipeline spends reading a request's trace context (``tracing._extract``: the global
propagator, given the screening header getter), counted by valgrind, for requests without trace headers, with valid
ones, and with hostile ones.

Usage: ``python benchmarks/extract_instructions.py [--cases none,traceparent,...] [--calls 1000]``. For each case a
driver runs twice under ``valgrind --tool=cachegrind --cache-sim=no`` with ``PYTHONHASHSEED=0``: it imports the
middleware, calls ``_extract`` on the openai SDK's request headers plus the case's 50 times, then ``--calls`` more
times (or none), and exits at once; the instructions per call are ``(I(calls) - I(0)) / calls``. Reproducible to
about 0.1 k. Hostile cases make log records as OpenTelemetry would (kept by a handler that drops them), so a
warning's cost counts. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: The request headers the openai SDK sends (its own, with a key and a JSON body).
SDK_HEADERS = [
    ("host", "127.0.0.1:8000"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("accept", "application/json"),
    ("content-type", "application/json"),
    ("user-agent", "OpenAI/Python 2.8.1"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "2.8.1"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "CPython"),
    ("x-stainless-runtime-version", "3.12.3"),
    ("authorization", "Bearer sk-test"),
    ("x-stainless-async", "false"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"),
    ("content-length", "70"),
]
#: The trace headers of each case, beside the SDK's.
CASES: dict[str, list[tuple[str, str]]] = {
    "none": [],
    "traceparent": [("traceparent", TRACEPARENT)],
    "tracestate": [("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")],
    "baggage3": [("traceparent", TRACEPARENT), ("baggage", "team=search,tier=gold,user=u1")],
    "baggage170": [
        ("traceparent", TRACEPARENT),
        ("baggage", ",".join(f"key{i}=value-{i:04d};p=1" for i in range(170))),
    ],
    "long-traceparent": [("traceparent", TRACEPARENT + "-" + "a" * 600)],
    "bad-tracestate": [("traceparent", TRACEPARENT), ("tracestate", "congo=t61rcWkgMzE,Evil=" + "Z" * 2000)],
    "bad-baggage": [("traceparent", TRACEPARENT), ("baggage", ",".join(["x" * 40] * 50))],
}
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def drive(case: str, calls: int) -> None:
    """The driver, run under valgrind. It measures the default propagators, whatever the shell's ``OTEL_*``
    settings (an ``OTEL_PROPAGATORS`` would otherwise be measured and printed as theirs)."""
    import logging

    import procs

    procs.drop_settings()
    from llm_telemetry.tracing import _extract

    logging.getLogger().addHandler(logging.NullHandler())  # (records are made, as a server makes them; not shown)
    headers = [(name.encode(), value.encode("latin-1")) for name, value in SDK_HEADERS + CASES[case]]
    for _ in range(50 + calls):
        _extract(headers)
    sys.stdout.flush()
    os._exit(0)


def instructions(case: str, calls: int) -> int:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--drive", case, "--calls", str(calls)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = _IREFS.search(done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive, args.calls)
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    print(f"== instructions per _extract (valgrind, {args.calls} calls, the openai SDK's headers plus the case's) ==")
    print(f"{'case':<18} {'k instructions':>15}")
    for case in args.cases.split(","):
        per_call = (instructions(case, args.calls) - instructions(case, 0)) / args.calls
        print(f"{case:<18} {per_call / 1000:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
