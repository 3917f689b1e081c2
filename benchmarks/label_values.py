"""Cost of a label value's checks (``llm_telemetry.labels.label_value``) on values built against them.

Every request asks ``label_value`` about its model (the request log line's message) whatever the label's count, and
a client chooses the model name and the attribution headers' values, new on each request if it likes, so the
remembered answers do not help. Each row is one shape at three lengths up to the 256 characters a label value may
have: the time per call of a value never seen before, and per character. A linear cost keeps the last column flat
down a shape's rows; a quadratic one (as an IPv6 pattern of two runs around a colon was: 4 ms at 256 characters)
grows with the length.

    python benchmarks/label_values.py [--calls 400]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from llm_telemetry.labels import label_value

#: The shapes: each makes ``n`` characters from the searches' own characters, ending so that none matches.
SHAPES: dict[str, Callable[[int], str]] = {
    "plain letters (reference)": lambda n: "m" * n,
    "colons (IPv6)": lambda n: ":" * n,
    "[ and colons (IPv6, bracketed)": lambda n: "[" + ":" * (n - 1),
    "0: repeated (IPv6)": lambda n: ("0:" * n)[:n],
    "a@ repeated (e-mail)": lambda n: ("a@" * n)[:n],
    "a@a. repeated (e-mail domain)": lambda n: ("a@a." * n)[:n],
    "1. repeated (IPv4)": lambda n: ("1." * n)[:n],
    "+ and digits (phone)": lambda n: "+" + ("1 " * n)[: n - 1],
    "digit runs 415-555 (phone)": lambda n: ("415-555-" * n)[:n],
    "eyJ runs and dots (token)": lambda n: ("eyJabcdefghij." * n)[:n],
}


_fresh = iter(range(10**9))


def per_call(shape: Callable[[int], str], length: int, calls: int) -> float:
    """Seconds per call of ``label_value`` on ``calls`` values of ``shape`` never asked about before."""
    # A distinct ending each time, outside every shape's characters, so no answer is remembered.
    values = [shape(length - 8) + f"z{next(_fresh):07d}" for _ in range(calls)]
    start = time.perf_counter()
    for value in values:
        label_value(value)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="new values per row (default 400)")
    args = parser.parse_args()
    print(f"{'shape':<34} {'chars':>6} {'us/call':>9} {'ns/char':>8}")
    for name, shape in SHAPES.items():
        for length in (32, 128, 256):
            seconds = min(per_call(shape, length, args.calls) for _ in range(3))
            print(f"{name:<34} {length:>6} {seconds * 1e6:>9.1f} {seconds * 1e9 / length:>8.1f}")


if __name__ == "__main__":
    main()
