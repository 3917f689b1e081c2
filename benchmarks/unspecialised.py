"""List the bytecodes on the middleware's request path that CPython 3.11 could not specialise.

Usage: ``python benchmarks/unspecialised.py [--variant ours+traces] [--scenarios stream64,chat] [--requests 300]
[--all-ops] [--packages llm_telemetry,opentelemetry]``.

CPython 3.11 rewrites a bytecode for the types it meets once it has run a few times (``LOAD_ATTR`` of a slot,
``LOAD_METHOD`` of a method defined on the class, ``LOAD_GLOBAL`` of a module global, ...). Where that fails, as for
a call through an attribute that holds a function (``self._send(message)``) or a class attribute read through its
class, the instruction stays generic and pays a full lookup every time. This drives the app in-process as
``profile_hot_path.py`` does, then reads every function's quickened code: an instruction still in its adaptive
form whose inline counter is set has run and failed to specialise (an instruction that never ran keeps a zero
counter). By default only attribute, method and global loads are listed, the ones code can avoid; ``--all-ops``
adds the rest (subscripts of bytes, comparisons of bytes, calls of builtins with keywords), which are the
interpreter's own limits.
"""

from __future__ import annotations

import argparse
import asyncio
import dis
import gc
import os
import pathlib
import sys
import types
from collections.abc import Iterator

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

AVOIDABLE = ("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL", "STORE_ATTR")


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def generic_sites(packages: tuple[str, ...], all_ops: bool) -> list[tuple[str, int, str, str, str]]:
    """(file, line, function, opcode, argument) of every instruction that ran and stayed generic."""
    seen: set[int] = set()
    sites = []
    for obj in gc.get_objects():
        if not isinstance(obj, types.FunctionType):
            continue
        filename = obj.__code__.co_filename
        package = next((p for p in packages if f"{os.sep}{p}{os.sep}" in filename), None)
        if package is None:
            continue
        for code in _codes(obj.__code__):
            if id(code) in seen:
                continue
            seen.add(id(code))
            quickened = code._co_code_adaptive  # type: ignore[attr-defined]
            for instruction in dis.get_instructions(code, adaptive=True):
                name = instruction.opname
                if not name.endswith("_ADAPTIVE") or not (all_ops or name.startswith(AVOIDABLE)):
                    continue
                counter = int.from_bytes(quickened[instruction.offset + 2 : instruction.offset + 4], "little")
                if counter:
                    where = package + filename.split(f"{os.sep}{package}", 1)[1]
                    line = instruction.positions.lineno if instruction.positions else 0
                    sites.append((where, line or 0, code.co_name, name, instruction.argrepr))
    return sorted(set(sites))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="ours+traces")
    parser.add_argument("--scenarios", default="stream64,chat", help="comma-separated")
    parser.add_argument("--requests", type=int, default=300, help="per scenario")
    parser.add_argument("--packages", default="llm_telemetry", help="comma-separated, e.g. llm_telemetry,opentelemetry")
    parser.add_argument("--all-ops", action="store_true", help="also the generic forms code cannot avoid")
    args = parser.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print("this reads CPython 3.11's quickened bytecode; other versions lay it out differently", file=sys.stderr)
        return 2
    import procs

    procs.drop_settings()  # the variant as the benchmark configures it, not as the shell would
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "3600000"  # nothing exported while this runs
    import profile_hot_path
    from loadgen import SCENARIOS

    app = profile_hot_path.build(args.variant)
    for name in args.scenarios.split(","):
        asyncio.run(profile_hot_path.drive(app, SCENARIOS[name], args.requests))
    sites = generic_sites(tuple(args.packages.split(",")), args.all_ops)
    for where, line, function, opname, argument in sites:
        print(f"{where}:{line}  {function}  {opname} {argument}".rstrip())
    print(f"{len(sites)} generic instructions that ran ({args.variant}: {args.scenarios}, {args.requests} each)")
    sys.stdout.flush()
    os._exit(0)  # the variant's exporters would otherwise try to deliver to a sink that is not running


if __name__ == "__main__":
    sys.exit(main())
