"""Exact metrics when a server runs the app in several worker processes (``uvicorn --workers N``, gunicorn).

Each worker records into its own memory-mapped file (prometheus_client's ``MmapedDict``) in a directory shared
by the workers of one server. A scrape, answered by whichever worker holds the metrics port, merges the files
and hands the result to OpenTelemetry's own Prometheus exporter, so names, labels, HELP/TYPE/UNIT and buckets
are exactly those of the single-process mode. A worker's liveness is an ``flock`` it holds on its own file:
the kernel drops it when the process dies however it dies, so no server hook is needed. Files of dead workers
are folded into ``archive.json`` (their counters and histograms are kept, their live gauge shares dropped).

Nothing here runs in a single-process server: :func:`activate` returns None and the middleware keeps the
plain OpenTelemetry meter provider. See ``docs/workers.md`` for the design and its limits.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, mmap_dict

from . import exposition
from .config import LLM_TELEMETRY_MULTIPROC_DIR, Settings
from .instruments import (
    CARDINALITY_LIMIT,
    CONTRACT,
    OVERFLOW_ATTRIBUTES,
    Histograms,
    Instruments,
    create_instruments,
    overflow_attributes,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: liveness falls back to the pid
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("llm_telemetry")


class MmapedDict(mmap_dict.MmapedDict):  # type: ignore[misc]
    """prometheus_client's memory-mapped dict of doubles (the storage of its own multiprocess mode), with its file's
    blocks reserved before they are mapped. Its file is sparse: writing a page with no block behind it on a full
    file system (a small ``emptyDir`` with ``medium: Memory``) kills the process with SIGBUS, which nothing can
    catch. Reserved first, a full file system is an ``OSError`` where the file is opened or grown instead."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            with open(filename, "a+b") as created:
                size = os.fstat(created.fileno()).st_size
                try:
                    _reserve(created.fileno(), size or mmap_dict._INITIAL_MMAP_SIZE)
                except OSError:
                    if not size:  # made here: not left behind empty (it would read as no file at all)
                        with contextlib.suppress(OSError):
                            os.unlink(filename)
                    raise
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        # As the parent grows it: reserved first, so its truncate() only takes the size already allocated.
        needed = self._used + 4 + len(key.encode("utf-8")) + 8 + 16
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity != self._capacity:
            _reserve(self._f.fileno(), capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]


def _reserve(fd: int, size: int) -> None:
    """Allocate the blocks of the first ``size`` bytes of ``fd`` (extending it), or raise ``OSError``."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


#: prometheus_client's variable; when set, our state goes into its ``llm_telemetry`` subdirectory.
PROMETHEUS_MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
#: Values of ``LLM_TELEMETRY_MULTIPROC_DIR`` that turn multi-worker mode off even under a supervisor.
DISABLED: Final = ("off", "none", "false", "0")
#: Seconds between attempts of a worker to take over the metrics port while another worker holds it.
BIND_RETRY_SECONDS: Final = 1.0
#: Failed attempts in a row, with no worker of this server holding the port, after which a worker says that
#: another process holds it (a worker that has just bound it claims it within milliseconds).
FOREIGN_HOLDER_ATTEMPTS: Final = 3
#: Seconds without a change, and with no live worker, after which the directory of a server in another PID
#: namespace (another container on a shared ``/tmp``) counts as left behind, and the default location's sweep
#: removes it: its pids mean nothing in this namespace, so they cannot tell.
ABANDONED_SECONDS: Final = 300.0

#: The attribute that marks an instrument's overflow series (see instruments.overflow_attributes).
(_OVERFLOW_ATTRIBUTE,) = OVERFLOW_ATTRIBUTES

_ARCHIVE = "archive.json"
#: Key of the archive's exact sums: per key of its rounded ``values`` whose dead workers' sum a float cannot hold, that
#: sum as a few floats (see :func:`_exact_add`); a key without one is exactly its value.
_PARTIALS = "partials"
#: Label values admitted so far, per label, shared by the workers so the count bound is per deployment.
_LABELS = "labels.json"
_RUN = "run"
#: The stem of the worker that serves the metrics port.
_PORT = "port"
#: The newest plain rendering of the app's own path any worker has made, one file per format: the text format's, and
#: OpenMetrics' (see SharedState.publish). One file for both had each scrape of the one format replace the other's
#: rendering, and scrapers of the two formats together shared none.
_RENDERING = "rendering"
_RENDERINGS: Final = (_RENDERING, _RENDERING + "-openmetrics")
#: What an earlier version kept here: removed with the rest of an earlier run's state.
_MERGE = "merge"
_ALIVE = ".alive"
_DB = ".db"
#: Field of a key: monotonic sum, live gauge, histogram sum; histogram buckets are "b<index>".
_COUNTER, _GAUGE, _SUM = "c", "g", "s"


@dataclass(frozen=True)
class Supervisor:
    """The process that started this worker and replaces it when it dies."""

    #: "uvicorn", "gunicorn", or "parent" when the mode was asked for explicitly.
    kind: str
    pid: int


def detect_supervisor() -> Supervisor | None:
    """This process's multi-worker supervisor, or None when it is not a worker of one.

    uvicorn (``--workers N`` with N > 1) spawns workers with multiprocessing; the spawned process object keeps
    its target, ``uvicorn._subprocess.subprocess_started``, whose ``target`` argument is a method of
    ``uvicorn.supervisors.multiprocess.Process`` (``--reload`` runs ``Server.run`` instead). gunicorn's arbiter
    sets ``SERVER_SOFTWARE=gunicorn/<version>`` and forks its workers, so it is the parent process.
    """
    process = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    target = getattr(process, "_target", None)
    if parent is not None and getattr(target, "__module__", None) == "uvicorn._subprocess":
        owner = getattr(getattr(process, "_kwargs", {}).get("target"), "__self__", None)
        if type(owner).__module__ == "uvicorn.supervisors.multiprocess" and parent.pid:
            return Supervisor("uvicorn", parent.pid)
    if os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/") and "gunicorn.arbiter" in sys.modules:
        ppid = os.getppid()
        if ppid > 0:  # the arbiter is often pid 1 in a container
            return Supervisor("gunicorn", ppid)
    return None


def pid_namespace() -> str:
    """This process's PID namespace (the inode number ``/proc/self/ns/pid`` links to) on Linux, else "".

    Two containers of one pod have a namespace each, and the same pids in them (the server is often pid 1 in
    both); when they share a ``/tmp`` (one ``emptyDir``), their state directories are told apart by it."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return "".join(ch for ch in link if ch.isdigit())


def process_token(pid: int) -> str:
    """Identifies one lifetime of ``pid``: its start time and PID namespace on Linux (``pid@start@namespace``),
    else the pid alone (empty when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # Field 22 (starttime); the command name in field 2 may contain spaces, so split after its ')'.
            token = f"{pid}@{stat.read().rsplit(b')', 1)[1].split()[19].decode()}"
        namespace = pid_namespace()
        return f"{token}@{namespace}" if namespace else token
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except OSError:
        pass
    return str(pid)


def activate(settings: Settings, env: Mapping[str, str] | None = None) -> WorkerMode | None:
    """Decide whether this process is one of several workers; None (the common case) costs nothing more.

    An explicit directory (``LLM_TELEMETRY_MULTIPROC_DIR``/``multiproc_dir`` or ``PROMETHEUS_MULTIPROC_DIR``)
    turns the mode on for any supervisor, taking the parent process as the supervisor; ``off`` turns the shared
    state off: a worker of a detected supervisor then keeps its own numbers, and still pushes them over OTLP under
    an identity of its own (:meth:`WorkerMode.worker_resource`).
    """
    env = os.environ if env is None else env
    explicit = settings.multiproc_dir
    supervisor = detect_supervisor()
    if explicit is not None and explicit.strip().lower() in DISABLED:
        # Without it, every worker pushed under the one service.instance.id configured for the service (or the
        # OpenTelemetry Operator's): a receiver saw the workers' cumulative sums as one series going up and down.
        return WorkerMode(supervisor, None) if supervisor is not None else None
    prom_dir = env.get(PROMETHEUS_MULTIPROC_DIR, "").strip()
    if supervisor is None:
        if not explicit and not prom_dir:
            return None
        ppid = os.getppid()
        supervisor = Supervisor("parent", ppid if ppid > 0 else os.getpid())
    if "prometheus" not in settings.metrics_exporters:
        return WorkerMode(supervisor, None)
    directory = explicit or (os.path.join(prom_dir, "llm_telemetry") if prom_dir else None)
    # Where the directory came from, for the warning: the setting to change.
    if explicit:
        source = f"{LLM_TELEMETRY_MULTIPROC_DIR} (or multiproc_dir=)"
    elif prom_dir:
        source = PROMETHEUS_MULTIPROC_DIR
    else:
        source = f"the default location; {LLM_TELEMETRY_MULTIPROC_DIR} sets another"
    try:
        if directory is None:
            directory = default_directory(supervisor, env)
        state = SharedState(directory, supervisor)
    except OSError as exc:
        logger.warning(
            "llm-telemetry: multi-worker state directory %s (%s) is unusable (%s); each worker reports only its own"
            " share",
            directory or "(default)",
            source,
            exc,
        )
        return WorkerMode(supervisor, None, exc)
    return WorkerMode(supervisor, state)


def default_directory(supervisor: Supervisor, env: Mapping[str, str] | None = None) -> str:
    """``<tmp>/llm-telemetry-<uid>/<kind>-<supervisor pid>-<pid namespace>`` (without the namespace where there is
    none); directories of supervisors gone are removed. A gunicorn arbiter started by ``USR2`` continues the
    directory of the arbiter it is the upgrade of (see :func:`_continue_upgraded`)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    base = os.path.join(tempfile.gettempdir(), f"llm-telemetry-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    info = os.lstat(base)
    # The temp dir is shared: refuse a symlink or a directory someone else made for us.
    if not os.path.isdir(base) or os.path.islink(base) or (hasattr(os, "getuid") and info.st_uid != uid):
        raise PermissionError(f"{base} is not a private directory of this user")
    namespace = pid_namespace()
    env = os.environ if env is None else env
    upgraded = env.get("GUNICORN_PID", "") if supervisor.kind == "gunicorn" else ""
    # The directory of the arbiter this one may be the USR2 upgrade of is left to _continue_upgraded: that arbiter
    # may have exited already, its workers with it (stopped right after USR2), and the sweep would take it.
    spared = _default_name("gunicorn", int(upgraded), namespace) if upgraded.isdigit() else ""
    _sweep(base, namespace, spared)
    path = os.path.join(base, _default_name(supervisor.kind, supervisor.pid, namespace))
    if spared and not os.path.lexists(path):
        _continue_upgraded(base, namespace, supervisor, path, int(upgraded))
    if not os.path.lexists(path):
        _relink(base, path, supervisor.pid, namespace)
    return path


def _relink(base: str, path: str, pid: int, namespace: str) -> None:
    """Make ``path`` a link again to the directory whose ``run`` record names the supervisor ``pid``, should there
    be one: a gunicorn upgrade's link (see :func:`_continue_upgraded`) that a temp cleaner removed (an age-based one
    takes a link first, its time never changing while the files it leads to are written). A worker the arbiter starts
    then (a replacement, ``TTIN``) joins the others in that directory instead of starting one of its own.

    The record is made with the link, so the same pass of the cleaner may have taken it too, before the workers put
    it back (within BIND_RETRY_SECONDS): the directory is then the one where a worker of this supervisor (a process
    whose parent it is, so not a pid reused by another server's) holds a lock on its files. Only a directory of this
    PID namespace is looked at: a pid of another one means nothing here."""
    token = process_token(pid)
    if not token:
        return
    names = [name for name in os.listdir(base) if os.path.join(base, name) != path]
    for name in names:
        directory = os.path.join(base, name)
        if os.path.islink(directory):
            continue
        try:
            with open(os.path.join(directory, _RUN), encoding="utf-8") as run:
                if token not in run.read().split():
                    continue
        except OSError:
            continue
        with contextlib.suppress(FileExistsError):  # another worker put it back first
            os.symlink(name, path)
        return
    for name in names:
        directory = os.path.join(base, name)
        if (namespace and not name.endswith(f"-{namespace}")) or os.path.islink(directory):
            continue
        try:
            files = os.listdir(directory)
        except OSError:
            continue
        for file in files:
            worker = file[1:].partition("-")[0] if file.startswith("w") and file.endswith((_ALIVE, _DB)) else ""
            if worker.isdigit() and _parent(int(worker)) == pid and _held(os.path.join(directory, file)):
                with contextlib.suppress(FileExistsError):
                    os.symlink(name, path)
                return


def _continue_upgraded(base: str, namespace: str, supervisor: Supervisor, path: str, old: int) -> None:
    """Make ``path`` a link to the directory of the gunicorn arbiter that this one is the ``USR2`` upgrade of, with
    this arbiter added to its ``run`` record, so that the totals go on from the old arbiter's.

    gunicorn's ``USR2`` forks the old arbiter and executes it again with ``GUNICORN_PID`` set to the old arbiter's
    pid; the new arbiter is the old one's child, and its workers inherit that variable, until the old arbiter exits
    (gunicorn then "promotes" the new one and drops it). The first worker that sees both makes the link; the workers
    started later, without the variable, find it. The sweep keeps the directory while any arbiter its record names
    lives, or any worker in it.

    ``old`` is the pid in ``GUNICORN_PID``. While the old arbiter runs it must be this arbiter's parent, and its
    directory's record must name it. Once it has exited (stopped before this arbiter's first worker got here, or
    killed) this arbiter has another parent, and the record must name a process of that pid that has exited and
    had started before this arbiter (as the arbiter that forked it had): a later process given the same pid starts
    after."""
    target = os.path.realpath(os.path.join(base, _default_name("gunicorn", old, namespace)))
    if os.path.dirname(target) != os.path.realpath(base) or not os.path.isdir(target):
        return
    mine = process_token(supervisor.pid)
    with _directory_locked(target):
        try:
            with open(os.path.join(target, _RUN), encoding="utf-8") as run:
                tokens = run.read().split()
        except OSError:
            return
        if _parent(supervisor.pid) == old:
            if process_token(old) not in tokens:
                return  # not the old arbiter's record (its pid reused, or the record lost): start anew
        else:
            recorded = [token for token in tokens if token.partition("@")[0] == str(old)]
            if not recorded or _live(recorded[-1]) or not _started(recorded[-1]) <= _started(mine) < math.inf:
                return  # GUNICORN_PID names a process that is not the arbiter this one was forked from
        _write_run(target, [*tokens, mine])
        with contextlib.suppress(FileExistsError):  # another worker of this arbiter made it first
            os.symlink(os.path.basename(target), path)


@contextlib.contextmanager
def _directory_locked(directory: str) -> Iterator[None]:
    """The lock of a state directory (see SharedState._locked), for a directory no worker of this one uses yet."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live(token: str) -> bool:
    """Whether the process of a ``run`` record's token (see :func:`process_token`) still runs."""
    pid = token.partition("@")[0]
    return pid.isdigit() and process_token(int(pid)) == token


def _started(token: str) -> float:
    """The start time (clock ticks after boot) in a ``run`` record's token, or infinity when it has none."""
    started = token.split("@")[1] if token.count("@") else ""
    return int(started) if started.isdigit() else math.inf


def _write_run(directory: str, tokens: Sequence[str]) -> None:
    """The ``run`` record of ``directory``: the supervisors whose workers use it, one token a line (the last one's
    and those still running)."""
    kept = [token for token in dict.fromkeys(tokens) if token == tokens[-1] or _live(token)]
    run = os.path.join(directory, _RUN)
    with open(run + ".tmp", "w", encoding="utf-8") as fresh:
        fresh.write("\n".join(kept))
    os.replace(run + ".tmp", run)


def _default_name(kind: str, pid: int, namespace: str) -> str:
    """The name, in the default location, of the directory of the supervisor ``pid`` of ``kind``."""
    return f"{kind}-{pid}" + (f"-{namespace}" if namespace else "")


def _sweep(base: str, namespace: str, spared: str = "") -> None:
    """Remove the directories of supervisors that have exited: of this PID namespace by their pid and start time
    (every supervisor its ``run`` record names, and no worker left in it), of another one (a container beside this
    one) once left behind (see :data:`ABANDONED_SECONDS`). A link (a gunicorn upgrade's, see
    :func:`_continue_upgraded`) goes with the directory it names. ``spared`` (a name) and the directory it links to
    are left as they are."""
    left = {spared, os.path.basename(os.path.realpath(os.path.join(base, spared)))} if spared else set()
    for name in os.listdir(base):
        if name in left:
            continue
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, _RUN), encoding="utf-8") as run:
                tokens = run.read().split()
        except OSError:
            if os.path.islink(path) and not os.path.exists(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        theirs = tokens[0].partition("@")[2].partition("@")[2] if tokens else ""
        if theirs and theirs != namespace:
            gone = _abandoned(path)
        else:
            gone = (
                bool(tokens)
                and all(token.partition("@")[0].isdigit() and not _live(token) for token in tokens)
                and not _workers_in(path)
            )
        if gone and os.path.islink(path):
            with contextlib.suppress(OSError):
                os.unlink(path)  # the directory it names goes under its own name
        elif gone:
            _remove_if_gone(path, theirs == namespace or not theirs)


def _remove_if_gone(path: str, by_record: bool) -> None:
    """Remove the directory ``path`` the sweep found gone; one judged by its record only if that still names no live
    supervisor once its lock is held (a gunicorn upgrade may have added one meanwhile, see _continue_upgraded)."""
    if by_record:
        try:
            with _directory_locked(path):
                with open(os.path.join(path, _RUN), encoding="utf-8") as run:
                    if any(_live(token) for token in run.read().split()):
                        return
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            return
    else:
        shutil.rmtree(path, ignore_errors=True)


def _abandoned(path: str) -> bool:
    """Whether no worker holds a liveness lock in ``path`` and nothing in it changed for ABANDONED_SECONDS."""
    if fcntl is None:  # pragma: no cover - no locks to tell by
        return False
    try:
        if time.time() - os.stat(path).st_mtime < ABANDONED_SECONDS:
            return False
    except OSError:
        return False
    return not _workers_in(path)


def _workers_in(path: str) -> bool:
    """Whether a live worker holds a liveness lock in the directory ``path`` (True when it cannot be read)."""
    if fcntl is None:  # pragma: no cover - no locks to tell by
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return True
    return any(_held(os.path.join(path, name)) for name in names if name.endswith((_ALIVE, _DB)))


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _held(path: str) -> bool:
    """Whether a live process holds the ``flock`` on ``path`` (a worker's liveness file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # also releases the lock if we got it
    return False


class WorkerMode:
    """What a worker of a multi-worker server does differently: shared Prometheus state, its own OTLP identity.

    Args:
        supervisor: the server's supervisor process.
        state: the shared directory, or None when Prometheus export is off (OTLP only) or the directory is unusable.
        error: why the directory is unusable, when it is.
    """

    def __init__(self, supervisor: Supervisor, state: SharedState | None, error: OSError | None = None) -> None:
        self.supervisor = supervisor
        self.state = state
        self.error = error
        self._listener: _Listener | None = None

    def worker_resource(self, resource: Any) -> Any:
        """``resource`` with a ``service.instance.id`` of its own per worker, so OTLP backends can sum workers."""
        from opentelemetry.sdk.resources import Resource

        base = resource.attributes.get("service.instance.id") or str(uuid.uuid4())
        return resource.merge(Resource({"service.instance.id": f"{base}-{os.getpid()}"}))

    def create_instruments(
        self, scope_name: str, scope_version: str, otel_meter: Any = None, histograms: Histograms | None = None
    ) -> Instruments:
        """The contract's instruments, writing to this worker's file (and to ``otel_meter`` too when given, its
        histograms kept in ``histograms`` when given)."""
        assert self.state is not None
        meter = _SharedMeter(self.state, scope_name, scope_version, otel_meter, histograms)
        return create_instruments(meter)  # type: ignore[arg-type]

    def expose(self, registry: CollectorRegistry, resource: Any) -> None:
        """Answer scrapes of ``registry`` with the merge of every worker, through OpenTelemetry's exporter."""
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        assert self.state is not None
        state = self.state
        reader = PrometheusMetricReader(registry=registry)

        def collect(_reader: Any, timeout_millis: float = 0.0) -> Any:
            return state.metrics_data(resource)

        # The reader is attached to no meter provider: it collects what the workers' files hold instead.
        reader._set_collect_callback(collect)

    def serve(self, host: str, port: int, registry: CollectorRegistry) -> None:
        """Hold the metrics port if free; otherwise keep trying, so a worker takes over when its holder dies."""
        if self._listener is None:
            self._listener = _Listener(host, port, registry, self.state)
            self._listener.start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self.state is not None:
            self.state.close()


# --- the shared directory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Descriptor:
    name: str
    kind: str  # "counter", "updowncounter", "histogram"
    unit: str
    description: str
    bounds: tuple[float, ...] = ()


class SharedState:
    """This worker's file in the shared directory, and the merge of all workers' files.

    Args:
        directory: the directory shared by the workers of one server (created if missing).
        supervisor: the server's supervisor; state left by an earlier supervisor is wiped.
    """

    def __init__(self, directory: str, supervisor: Supervisor) -> None:
        self.directory = directory
        self.descriptors: dict[str, _Descriptor] = {}
        self.scope: tuple[str, str] = ("", "")
        self._write_lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._start_ns = time.time_ns()
        #: What the link ``directory`` says (a gunicorn upgrade's, see _continue_upgraded), or None when it is no link:
        #: the link is put back should a temp cleaner remove it (see _make_directory).
        self._link = os.readlink(directory) if os.path.islink(directory) else None
        _make_directory(directory, self._link)
        #: The directory (device, inode) as this worker last merged in it: another one is the directory made again.
        self._seen = _identity(directory)
        self._stem = f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"
        #: Keys of live series beyond the archive's room, and the overflow key each is shown under (see merged).
        self._redirects: dict[str, str] = {}
        self._token = process_token(supervisor.pid) or str(supervisor.pid)
        #: The archive as this worker last read it from its file or wrote it, or None: put back should the file be
        #: removed, by a worker that merges (its copy is as new as its last scrape).
        self._archive: dict[str, Any] | None = None
        #: Whether this worker serves the metrics port (its claim is put back should the file be removed).
        self._claimed = False
        #: Whether the last write of the archive failed (logged once until one succeeds).
        self._archive_unsaved = False
        #: The label values as this worker last read or wrote them (see :meth:`admit`).
        self._labels: dict[str, list[str]] = {}
        self._closed = threading.Event()
        #: Per thread, the order of its last merge (see :meth:`publish`).
        self._last_merge = threading.local()
        with self._locked():
            self._wipe_if_stale(self._token)
            # Workers that died since the last merge are folded now too: with nobody scraping (or no metrics port),
            # recycled workers' files would otherwise pile up until the next scrape.
            self._fold_dead(self._load_archive())
            self._alive: Any = self._open_alive()
            try:
                self._file: Any = MmapedDict(os.path.join(directory, self._stem + _DB))
                self._db_lock: Any = self._lock_file(self._stem + _DB)
            except BaseException:
                # (A full file system, say.) Nothing of this worker stays: its lock held by the error kept for the
                # warning, it would count as a live worker with a values file of nothing, for good.
                self._alive.close()
                for suffix in (_DB, _ALIVE):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, self._stem + suffix))
                raise
        threading.Thread(target=self._keep, name="llm-telemetry-state", daemon=True).start()

    def _keep(self) -> None:
        """Every BIND_RETRY_SECONDS until closed: put this worker's files back should someone remove them."""
        while not self._closed.wait(BIND_RETRY_SECONDS):
            try:
                self.restore()
            except OSError as exc:
                logger.debug("llm-telemetry: state files not put back: %s", exc)

    def _lock_file(self, name: str) -> Any:
        """``name`` opened and locked for this worker's life: a second liveness lock, on its values file, which
        changes with every request, so an age-based /tmp cleaner does not take it as it takes the liveness file."""
        held = open(os.path.join(self.directory, name), "rb")
        if fcntl is not None:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return held

    def _open_alive(self) -> Any:
        """This worker's liveness file, created and locked: held for the worker's life."""
        alive = open(os.path.join(self.directory, self._stem + _ALIVE), "wb")
        if fcntl is not None:
            fcntl.flock(alive.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return alive

    def restore(self) -> bool:
        """Put back what this worker keeps in the directory should someone have removed it (an age-based /tmp
        cleaner takes the files that never change first: the ``run`` record and the liveness files; ``rm -rf``
        takes all): the directory, the ``run`` record, its liveness file and its values file (rewritten from the
        values it holds), and for the worker serving the metrics port its claim and the archive as it last saw it.
        True when anything was missing. Called every second by the workers waiting for the metrics port, and
        before each merge."""
        path = functools.partial(os.path.join, self.directory)
        db = path(self._stem + _DB)
        with self._write_lock:
            if self._alive is None:
                return False  # closed
            alive_kept, db_kept, missing = self._gone()
            if alive_kept and db_kept and not missing:
                return False
            if _make_directory(self.directory, self._link):
                logger.info(
                    "llm-telemetry: the link %s to the multi-worker state directory %s was removed; worker %s put it"
                    " back",
                    self.directory,
                    os.path.realpath(self.directory),
                    os.getpid(),
                )
            with self._locked():
                # Looked at again inside the lock: a save of the archive (by a merge of this worker, in another
                # thread) may have been under way, its version file not yet written, when the look above read it.
                alive_kept, db_kept, missing = self._gone()
                if alive_kept and db_kept and not missing:
                    return False
                if not alive_kept:
                    # First: a live worker's lock is what tells the check below that this is no earlier run's state.
                    old = self._alive
                    self._alive = self._open_alive()
                    old.close()
                self._wipe_if_stale(self._token)
                if not db_kept:
                    old = self._file
                    self._file = MmapedDict(db)
                    old.close()
                    for key, value in self._values.items():
                        self._file.write_value(key, value, 0.0)
                    self._db_lock.close()
                    self._db_lock = self._lock_file(self._stem + _DB)
                if _ARCHIVE in missing and self._archive is not None:
                    # Under the lock, read as a merge reads it (this worker's newer copy wins); still missing, this
                    # worker's copy goes back as it is: another worker may have a newer one, and puts that back over
                    # it within a second.
                    self._load_archive()
                    if not (os.path.exists(path(_ARCHIVE)) and os.path.exists(path(_ARCHIVE + ".version"))):
                        self._save_archive(self._archive, bump=False)
                if _PORT in missing:
                    self.claim_port()
        logger.warning(
            "llm-telemetry: files of the multi-worker state directory %s were removed; worker %s put its own back",
            self.directory,
            os.getpid(),
        )
        return True

    def _gone(self) -> tuple[bool, bool, list[str]]:
        """Whether this worker's liveness file and values file are in place, and which of the shared files it puts
        back are missing (the archive also when the directory's is older than this worker's copy). With the
        ``_write_lock`` held; only with the directory lock held too is a save of the archive never half-way."""
        path = functools.partial(os.path.join, self.directory)
        # The archive and the port claim only by the worker that merges (its copy is the newest).
        shared = [_RUN]
        if self._archive is not None:
            shared.append(_ARCHIVE)
        if self._claimed:
            shared.append(_PORT)
        try:
            alive_kept = os.stat(path(self._stem + _ALIVE)).st_ino == os.fstat(self._alive.fileno()).st_ino
        except FileNotFoundError:
            alive_kept = False
        db_kept = os.path.exists(path(self._stem + _DB))
        missing = [name for name in shared if not os.path.exists(path(name))]
        if (
            self._archive is not None
            and not self._archive_unsaved
            and _ARCHIVE not in missing
            and self._archive_behind()
        ):
            # Put back from an older copy than this worker's. (Not when this worker's newer copy could not be
            # written, the file system full: the next merge that can writes it.)
            missing.append(_ARCHIVE)
        return alive_kept, db_kept, missing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialises workers joining, and merges (which may fold dead workers' files into the archive).

        The lock is an ``flock`` on the directory itself, not on a file in it: an age-based temp cleaner removes
        a file nobody writes to while a worker holds its lock, and the next worker would then lock a new file of
        the same name and be inside at once (two merges folding dead workers into the archive, one's writes lost).
        """
        while True:
            try:
                fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except FileNotFoundError:  # the directory was removed: made again (the workers put their files back)
                _make_directory(self.directory, self._link)
                continue
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    # Removed and made again while this waited: the lock of the directory in use is another.
                    held, current = os.fstat(fd), _stat(self.directory)
                    if current is None or (held.st_dev, held.st_ino) != (current.st_dev, current.st_ino):
                        continue
                yield
                return
            finally:
                os.close(fd)

    def _wipe_if_stale(self, token: str) -> None:
        run = os.path.join(self.directory, _RUN)
        tokens: list[str] = []
        try:
            with open(run, encoding="utf-8") as existing:
                tokens = existing.read().split()
        except FileNotFoundError:
            pass
        if token in tokens:
            return
        names = os.listdir(self.directory)
        if any(_held(os.path.join(self.directory, name)) for name in names if name.endswith((_ALIVE, _DB))):
            # Workers of this server are alive here: its record was removed (a /tmp cleaner), not left by an
            # earlier run (or they are an earlier server's, still finishing, which this one joins). Their numbers
            # stay; this supervisor is added to the record.
            _write_run(self.directory, [*tokens, token])
            return
        # A previous run of the server (or another server) left state here: a restart starts from zero.
        for name in names:
            if name in (_ARCHIVE, _ARCHIVE + ".version", _LABELS, _MERGE, *_RENDERINGS) or name.endswith(
                (_ALIVE, _DB, ".tmp")
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
        _write_run(self.directory, [token])

    # --- writing (the request path) ---

    def add(self, key: str, amount: float) -> None:
        with self._write_lock:
            value = self._values.get(key, 0.0) + amount
            self._values[key] = value
            self._file.write_value(key, value, 0.0)

    def add_many(self, keys: Sequence[str], amounts: Sequence[float]) -> None:
        with self._write_lock:
            for key, amount in zip(keys, amounts, strict=True):
                value = self._values.get(key, 0.0) + amount
                self._values[key] = value
                self._file.write_value(key, value, 0.0)

    def close(self) -> None:
        """Leave the pool cleanly: release the liveness lock; the next merge folds this worker's file."""
        with self._write_lock:
            if self._file is not None:
                self._file.close()
                self._file = _Closed()
            self._closed.set()
            if self._alive is not None:
                self._alive.close()
                self._alive = None
                self._db_lock.close()

    # --- label values (the count bound, see labels.py) ---

    def admit(self, label: str, value: str, max_values: int) -> set[str]:
        """Admit ``value`` for ``label`` if fewer than ``max_values`` are taken; every value admitted so far."""
        path = os.path.join(self.directory, _LABELS)
        with self._locked():
            try:
                with open(path, encoding="utf-8") as stored:
                    labels: dict[str, list[str]] = json.load(stored)
            except (FileNotFoundError, ValueError):
                # None yet (or a torn file from a killed writer: os.replace makes that unlikely), or removed under a
                # running server: the values this worker last saw stay admitted, and count against the bound.
                labels = {name: list(values) for name, values in self._labels.items()}
            values = labels.setdefault(label, [])
            if value not in values and len(values) < max_values:
                values.append(value)
                with open(path + ".tmp", "w", encoding="utf-8") as tmp:
                    json.dump(labels, tmp)
                os.replace(path + ".tmp", path)
            self._labels = labels
            return set(values)

    # --- merging (the scrape path) ---

    def merged(self) -> dict[str, float]:
        """Sum of every worker's values: the archive of dead workers plus each live worker's file.

        A series is shown under its own attributes only once the archive has a place for it (at most
        CARDINALITY_LIMIT per metric, as each worker's own file): a live series new to the archive takes a place
        there the first time it is shown, so that the values its worker leaves when it dies are folded back into
        the same series. One the archive has no room for is shown in its metric's overflow series from the start,
        and folded there. So a series once shown never moves, and never goes down (Prometheus would read a reset).
        """
        try:
            restored = self.restore()
        except OSError as exc:  # the directory cannot be made again: merge what there is
            logger.warning("llm-telemetry: multi-worker state directory %s not put back: %s", self.directory, exc)
            restored = False
        # The directory made again since this worker last merged (``rm -rf``) also needs the wait: this worker's own
        # files may be back already (its thread that looks each second put them back), the other workers' not yet,
        # with nothing of theirs left to tell they are missing; so does one made again between that look and the
        # lock, whose first merge would otherwise show the other workers' numbers gone.
        wait = restored or self._values_missing()
        while True:
            seen = _identity(self.directory)
            if wait or seen != self._seen:
                # Files were removed: give the other workers (which look every BIND_RETRY_SECONDS) time to put theirs
                # back before their numbers are summed, or this scrape would show them gone and the next one back,
                # which Prometheus would read as a counter reset and count again.
                time.sleep(BIND_RETRY_SECONDS * 2)
                exposition.paused(BIND_RETRY_SECONDS * 2)
            self._last_merge.order = None
            with self._locked():
                self._seen = _identity(self.directory)
                if self._seen != seen:
                    wait = True
                    continue
                # Merges are one at a time, under the lock: the clock read here orders them (the monotonic clock is the
                # host's, the same in every worker).
                self._last_merge.order = time.monotonic_ns()
                archive = self._load_archive()
                try:
                    stems = self._fold_dead(archive)
                except FileNotFoundError:
                    if os.path.isdir(self.directory):
                        raise
                    # The directory removed (``rm -rf``) after this merge took its lock: merged again once it is made
                    # again and the other workers have had time to put their files back.
                    wait = True
                    continue
                archived: dict[str, float] = archive["values"]
                # Each total is rounded once from the exact sum of its shares (the archive's, each live worker's), so it
                # is the same whichever worker answers (the stems come in the order of a set, another in each worker)
                # and whichever workers are folded already, and a float total (a cost, a histogram's sum) never shows
                # one unit in the last place less than before, which Prometheus would read as a counter reset. Integers
                # below 2**53 (bucket counts, requests, tokens) add exactly as floats: those totals are summed as they
                # come, and only the others keep their shares, in ``exact``, for math.fsum (a value of ``values`` is
                # always exact).
                values = dict(archived)
                exact = _exact_shares(archive)
                known: dict[str, set[str]] | None = (
                    None  # per metric, the attribute sets with a place (built if needed)
                )
                placed = False
                for stem in stems:
                    for key, value in self._read(stem):
                        if key not in archived:
                            redirect = self._redirects.get(key)
                            if redirect is None:
                                if known is None:
                                    known = _placed(archived)
                                redirect = _place(known, key)
                                if redirect == key:
                                    archived[key] = 0.0  # its place: the series is shown, and stays
                                    values.setdefault(key, 0.0)
                                    placed = True
                                else:
                                    self._redirects[key] = redirect
                            key = redirect
                        shares = exact.get(key)
                        if shares is not None:
                            shares.append(value)
                            continue
                        current = values.get(key, 0.0)  # the exact sum so far (an archive's value may be an int)
                        total = current + value
                        if value.is_integer() and not current % 1.0 and -_EXACT_INTEGERS < total < _EXACT_INTEGERS:
                            values[key] = total  # integers: exact too
                        else:
                            exact[key] = [current, value]
                if placed:
                    self._save_archive(archive)
                values.update(_totals(exact))
                return values

    def publish(
        self, content_type: str, until: float, status: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Offer the rendering of this thread's last merge to the scrapes of the app's own path that follow, in any
        worker, until ``until`` (``time.monotonic``), in the ``rendering`` file (see exposition.Renderings). It
        replaces the rendering there only if that one's merge came before this one's: a worker that merged before
        another and rendered more slowly must not put its older numbers back in place of the newer ones, already
        answered. One that cannot be written (a full file system) removes the one there instead, if older: it would
        otherwise be answered after this rendering's newer numbers, a counter going down, which Prometheus reads as a
        reset. Called before this rendering is answered.

        The body is written only while scrapes come close together: this one within the time the one before was
        shared, after that time ran out. A Prometheus scraping every few seconds gets a fresh rendering each time and
        would share nothing: for it, the file holds this merge's order and times alone, and no copy of an exposition
        is written per scrape (to a disk, or to the memory of an ``emptyDir`` with ``medium: Memory``)."""
        order = getattr(self._last_merge, "order", None)
        if order is None:
            return
        name = _rendering_name(content_type)
        path = os.path.join(self.directory, name)
        now = time.monotonic()
        before = _rendering_head(path)
        try:
            crowded = before is not None and now - float(before["until"]) < float(before["until"]) - float(
                before["made"]
            )
        except (KeyError, TypeError, ValueError):
            crowded = False
        tmp = f"{path}.{self._stem}-{threading.get_ident()}.tmp"
        head = {
            "order": order,
            "made": now,
            "until": until,
            "whole": crowded,
            "type": content_type,
            "status": status,
            "headers": headers,
        }
        try:
            with open(tmp, "wb") as written:
                written.write(json.dumps(head).encode() + b"\n")
                if crowded:
                    written.write(body)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            tmp = ""
        self._settle(order, tmp, name)

    def supersede(self) -> None:
        """This thread's last merge is answered in a rendering not shared (a scrape with a query): a published one
        of an earlier merge, of either format, is removed, as it would be answered after these newer numbers."""
        order = getattr(self._last_merge, "order", None)
        if order is not None:
            for name in _RENDERINGS:
                self._settle(order, "", name)

    def _settle(self, order: int, tmp: str, name: str) -> None:
        """Under the lock: the rendering written to ``tmp`` (or none: "") of the merge ``order`` takes the place of
        the one published in the file ``name`` if that one's merge came first; if there is none to take its place,
        that one goes."""
        path = os.path.join(self.directory, name)
        try:
            with self._locked():
                there = _rendering_head(path)
                if there is not None and isinstance(there.get("order"), int) and there["order"] >= order:
                    return  # a later merge's rendering is there already
                if tmp:
                    os.replace(tmp, path)
                    tmp = ""
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
        except OSError as exc:
            logger.debug("llm-telemetry: rendering not shared: %s", exc)
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def shared(self, content_type: str) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The rendering in the ``rendering`` file of ``content_type``'s format while it is fresh and of
        ``content_type``, if its body was written: (status, headers, body), else None (see :meth:`publish`)."""
        try:
            with open(os.path.join(self.directory, _rendering_name(content_type)), "rb") as rendering:
                head = json.loads(rendering.readline())
                if head["whole"] is not True or head["type"] != content_type or time.monotonic() >= head["until"]:
                    return None
                body = rendering.read()
            return str(head["status"]), [(str(name), str(value)) for name, value in head["headers"]], body
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _values_missing(self) -> bool:
        """Whether a live worker's values file is missing (it puts it back within BIND_RETRY_SECONDS)."""
        try:
            names = set(os.listdir(self.directory))
        except OSError:
            return False
        return any(
            name[: -len(_ALIVE)] + _DB not in names and _held(os.path.join(self.directory, name))
            for name in names
            if name.endswith(_ALIVE)
        )

    def _fold_dead(self, archive: dict[str, Any]) -> set[str]:
        """Fold the files of workers that died since the last merge into ``archive`` (saved if it changed), delete
        every dead worker's files, and return the live workers' stems. Called with the directory lock held."""
        absorbed = set(archive["absorbed"])
        # A worker's liveness file may be gone (a /tmp cleaner; the worker puts it back within a second): its values
        # file tells too.
        names = os.listdir(self.directory)
        stems = {name.rpartition(".")[0] for name in names if name.endswith((_ALIVE, _DB))}
        dead = {stem for stem in stems if stem != self._stem and not self._is_alive(stem)}
        fresh = dead - absorbed
        if fresh:
            for stem in sorted(fresh):
                _fold(archive, self._read(stem))
            archive["absorbed"] = sorted((absorbed & stems) | fresh)
            self._save_archive(archive)
        if self._archive_unsaved:
            return stems - dead  # their files stay until the archive holding them is written
        for stem in dead:
            for suffix in (_DB, _ALIVE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, stem + suffix))
        # A worker killed as it wrote a file of its own name (a rendering it was publishing, a claim of the metrics
        # port) left it behind: one a kill, a whole exposition each for the renderings, none ever written again.
        for name in names:
            if name.endswith(".tmp") and _tmp_owner(name) in dead:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
        return stems - dead

    def _is_alive(self, stem: str) -> bool:
        if fcntl is None:  # pragma: no cover
            pid = stem[1:].partition("-")[0]
            return bool(process_token(int(pid)))
        return any(_held(os.path.join(self.directory, stem + suffix)) for suffix in (_ALIVE, _DB))

    def claim_port(self) -> None:
        """Record that this worker serves the metrics port."""
        self._claimed = True
        port = os.path.join(self.directory, _PORT)
        try:
            with open(port + f".{self._stem}.tmp", "w", encoding="utf-8") as claim:
                claim.write(self._stem)
            os.replace(port + f".{self._stem}.tmp", port)
        except OSError as exc:
            # (The directory removed, or a full file system.) This worker serves the port all the same; the claim is
            # put back with its files (see restore), within BIND_RETRY_SECONDS. Raised, it ended the thread that
            # took the port over with a traceback, and would fail a worker's start.
            logger.debug("llm-telemetry: metrics port claim not recorded: %s", exc)

    def port_held_by_worker(self) -> bool:
        """Whether a live worker of this server has claimed the metrics port (see :meth:`claim_port`)."""
        try:
            with open(os.path.join(self.directory, _PORT), encoding="utf-8") as claim:
                stem = claim.read().strip()
        except OSError:
            return False
        return bool(stem) and (stem == self._stem or self._is_alive(stem))

    def _read(self, stem: str) -> Iterator[tuple[str, float]]:
        path = os.path.join(self.directory, stem + _DB)
        try:
            entries = list(MmapedDict.read_all_values_from_file(path))  # type: ignore[no-untyped-call]
        except (OSError, RuntimeError, ValueError, struct.error):
            # Gone, or not a values file as a worker writes it (empty: a worker killed as it made it): no values.
            return
        for key, value, _timestamp, _pos in entries:
            yield key, value

    def _load_archive(self) -> dict[str, Any]:
        """The archive of dead workers' values, with the directory lock held.

        Each save gives it a higher ``version`` (and the first one an ``id``), and each worker keeps the copy it last
        read or wrote. Should the file be removed under the running server, the copy this worker has stands in for
        it; should it have been put back from an older copy (same ``id``, lower ``version``), this worker's newer copy
        wins; should a worker that never saw it have made it anew (another ``id``: it folded a dead worker into an
        empty one), what this worker's copy holds is added to it, as the two hold different dead workers."""
        cached = self._archive
        try:
            with open(os.path.join(self.directory, _ARCHIVE), encoding="utf-8") as archive:
                loaded: dict[str, Any] = json.load(archive)
        except FileNotFoundError:
            if cached is None:
                return {"absorbed": [], "values": {}}
            loaded = json.loads(json.dumps(cached))
        else:
            if cached is not None and loaded.get("id") != cached.get("id"):
                theirs = _partials(cached)
                for key in cached["values"]:
                    for part in _exact_of(cached["values"], theirs, key):
                        _accumulate(loaded, key, part)
                self._save_archive(loaded)
            elif cached is not None and int(loaded.get("version", 0)) < int(cached.get("version", 0)):
                loaded = json.loads(json.dumps(cached))
                self._save_archive(loaded)
        self._archive = loaded
        return loaded

    def _save_archive(self, archive: dict[str, Any], bump: bool = True) -> bool:
        """Write ``archive``, as a new version (``bump``) or put back as it was; its id and version also go in a
        small file of their own, which every worker reads each second (see :meth:`_archive_behind`).

        Returns whether it was written. One that cannot be (the file system full) stays this worker's copy, newer
        than the directory's, so the next merge works from it and writes it again: the scrape is still answered,
        and the dead workers it folded keep their files until it is written."""
        archive.setdefault("id", uuid.uuid4().hex)
        if bump:
            archive["version"] = int(archive.get("version", 0)) + 1
        self._archive = archive
        path = os.path.join(self.directory, _ARCHIVE)
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as tmp:
                json.dump(archive, tmp)
            # Atomic: a merge that dies half-way leaves the old archive, whose "absorbed" list still matches the files.
            os.replace(path + ".tmp", path)
            with open(path + ".version.tmp", "w", encoding="utf-8") as tmp:
                tmp.write(f"{archive['id']} {archive['version']}")
            os.replace(path + ".version.tmp", path + ".version")
        except OSError as exc:
            for leftover in (path + ".tmp", path + ".version.tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            if not self._archive_unsaved:
                logger.warning(
                    "llm-telemetry: the multi-worker archive cannot be written to %s (%s): scrapes are answered from "
                    "this worker's copy until it can",
                    self.directory,
                    exc,
                )
            self._archive_unsaved = True
            return False
        if self._archive_unsaved:
            logger.warning("llm-telemetry: the multi-worker archive is written to %s again", self.directory)
        self._archive_unsaved = False
        return True

    def _archive_behind(self) -> bool:
        """Whether the archive in the directory is an older version of this worker's copy (or says nothing)."""
        assert self._archive is not None
        try:
            with open(os.path.join(self.directory, _ARCHIVE + ".version"), encoding="utf-8") as marker:
                their_id, _, version = marker.read().partition(" ")
            behind = their_id == self._archive.get("id") and int(version) < int(self._archive.get("version", 0))
        except (FileNotFoundError, ValueError):
            return True
        return behind

    def metrics_data(self, resource: Any) -> Any:
        """The merged values as OpenTelemetry ``MetricsData``, ready for the Prometheus exporter."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        series: dict[str, dict[tuple[Any, ...], dict[str, float]]] = {}
        for key, value in self.merged().items():
            name, field, attributes = json.loads(key)
            if name in self.descriptors:
                point = series.setdefault(name, {}).setdefault(tuple(map(tuple, attributes)), {})
                point[field] = value
        now = time.time_ns()
        cumulative = AggregationTemporality.CUMULATIVE
        metrics = []
        for name, points in series.items():
            desc = self.descriptors[name]
            data: Any
            if desc.kind == "histogram":
                hist_points = []
                for attrs, fields in points.items():
                    buckets = [int(fields.get(f"b{i}", 0.0)) for i in range(len(desc.bounds) + 1)]
                    hist_points.append(
                        HistogramDataPoint(
                            attributes=dict(attrs),
                            start_time_unix_nano=self._start_ns,
                            time_unix_nano=now,
                            count=sum(buckets),
                            sum=fields.get(_SUM, 0.0),
                            bucket_counts=buckets,
                            explicit_bounds=list(desc.bounds),
                            # Not tracked across workers; the Prometheus exposition has no min/max.
                            min=float("nan"),
                            max=float("nan"),
                        )
                    )
                data = Histogram(data_points=hist_points, aggregation_temporality=cumulative)
            else:
                field = _GAUGE if desc.kind == "updowncounter" else _COUNTER
                number_points = [
                    NumberDataPoint(
                        attributes=dict(attrs),
                        start_time_unix_nano=self._start_ns,
                        time_unix_nano=now,
                        value=fields.get(field, 0.0),
                    )
                    for attrs, fields in points.items()
                ]
                data = Sum(
                    data_points=number_points,
                    aggregation_temporality=cumulative,
                    is_monotonic=desc.kind == "counter",
                )
            metrics.append(Metric(name=name, description=desc.description, unit=desc.unit, data=data))
        scope = InstrumentationScope(self.scope[0], self.scope[1])
        return MetricsData(
            resource_metrics=[
                ResourceMetrics(
                    resource=resource,
                    scope_metrics=[ScopeMetrics(scope=scope, metrics=metrics, schema_url="")],
                    schema_url="",
                )
            ]
        )


def _parent(pid: int) -> int:
    """The parent of ``pid`` (Linux), or 0 when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _make_directory(directory: str, link: str | None = None) -> bool:
    """Make ``directory`` (and its parents) if missing; through a link (a gunicorn upgrade's, see
    :func:`_continue_upgraded`) whose directory was removed, that directory is made again. ``link``: what the link
    ``directory`` said when this worker joined; should the link itself be gone (a temp cleaner), it is made again,
    to the directory where this worker's files still are, and those of the workers that died there, not yet folded
    (a directory of its own in its place left those behind, their counts gone from the totals). True when this call
    made the link again."""
    relinked = False
    if link is not None and not os.path.lexists(directory):
        _private_directories(os.path.join(os.path.dirname(directory), link))
        try:
            os.symlink(link, directory)
            relinked = True
        except FileExistsError:  # another worker put it back first
            pass
    _private_directories(os.path.realpath(directory))
    return relinked


def _private_directories(path: str) -> None:
    """Make ``path`` and each missing parent with mode 0700 (``os.makedirs`` gives the parents the default mode: the
    default location's ``llm-telemetry-<uid>``, removed by a wipe of the temp dir and made again by the put-back, was
    left readable by every local user)."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _private_directories(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def _identity(directory: str) -> tuple[int, int] | None:
    """The (device, inode) of ``directory``, or None if it is missing."""
    found = _stat(directory)
    return None if found is None else (found.st_dev, found.st_ino)


def _tmp_owner(name: str) -> str:
    """The stem of the worker whose temporary file ``name`` is (``rendering.<stem>-<thread>.tmp``,
    ``port.<stem>.tmp``), else ""."""
    return "-".join(name[: -len(".tmp")].partition(".")[2].split("-")[:2])


def _rendering_name(content_type: str) -> str:
    """The file of the renderings of ``content_type``'s format: the text format's, or OpenMetrics' (the only other
    format prometheus_client answers). A version of a format another scraper asks for replaces the one there."""
    return _RENDERINGS[0] if content_type.startswith("text/plain") else _RENDERINGS[1]


def _rendering_head(path: str) -> dict[str, Any] | None:
    """The head of the rendering file at ``path`` (see SharedState.publish), or None."""
    try:
        with open(path, "rb") as rendering:
            head = json.loads(rendering.readline())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) else None


def _is_overflow(attrs: Iterable[Sequence[Any]]) -> bool:
    """Whether attributes as stored in a key (pairs) are those of an overflow series."""
    return any(pair[0] == _OVERFLOW_ATTRIBUTE for pair in attrs)


def _overflow_of(attributes: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The attributes, as stored in keys, of the overflow series that ``attributes`` are added to past the limit."""
    return _attrs_key(overflow_attributes(attributes))


def _placed(archive: Mapping[str, float]) -> dict[str, set[str]]:
    """Per metric, the attribute sets (JSON) with a place in the archive, the overflow ones left out."""
    series: dict[str, set[str]] = {}
    for key in archive:
        name, _field, attrs = json.loads(key)
        if not _is_overflow(attrs):
            series.setdefault(name, set()).add(json.dumps(attrs))
    return series


def _place(known: dict[str, set[str]], key: str, parsed: list[Any] | None = None) -> str:
    """``key`` itself if its series has a place in the archive or gets one now (``known`` updated), else the key of
    its metric's overflow series: once CARDINALITY_LIMIT other series of the metric have places. ``parsed``: the
    key's JSON, when the caller has read it already."""
    name, field, attrs = parsed if parsed is not None else json.loads(key)
    if _is_overflow(attrs):
        return key
    ident = json.dumps(attrs)
    series = known.setdefault(name, set())
    if ident in series:
        return key
    if len(series) >= CARDINALITY_LIMIT:
        return _key(name, field, _overflow_of(dict(attrs)))
    series.add(ident)
    return key


def _fold(archive: dict[str, Any], entries: Iterable[tuple[str, float]]) -> None:
    """Add a dead worker's values to the archive's, each series to its place (see :func:`_place`; a series shown
    while its worker lived has one already), so however many workers come and go the archive stays bounded like each
    worker's own file. Added exactly (see :func:`_accumulate`): folding a worker changes no merged total."""
    values: dict[str, float] = archive["values"]
    partials = archive.get(_PARTIALS)
    if not isinstance(partials, dict):
        partials = archive[_PARTIALS] = {}
    known: dict[str, set[str]] | None = None
    for key, value in entries:
        parsed = json.loads(key)
        if key not in values:
            if known is None:
                known = _placed(values)
            key = _place(known, key, parsed)
        if parsed[1] == _GAUGE:
            values.setdefault(key, 0.0)  # a dead worker's live gauge share disappears; its series stays, at 0
            continue
        current = values.get(key, 0.0)
        total = current + value
        if (
            key not in partials
            and value.is_integer()
            and not current % 1.0
            and -_EXACT_INTEGERS < total < _EXACT_INTEGERS
        ):
            values[key] = total  # integers: exact as they are
        else:
            _accumulate(archive, key, value)


# --- exact sums of floats -----------------------------------------------------------------------------------
# The total of a float series (a cost, a histogram's sum) is one rounding of the exact sum of the workers' values,
# never a chain of roundings whose result depends on the order of the additions: the archive keeps the exact sum of
# the dead workers' values as an expansion (Shewchuk, "Adaptive precision floating-point arithmetic", 1997), a list
# of floats with no bits in common, and math.fsum rounds archive and live values together exactly once.


def _partials(archive: Mapping[str, Any]) -> Mapping[str, Any]:
    """The archive's exact sums by key (none in an archive of an earlier version, or a damaged one)."""
    partials = archive.get(_PARTIALS)
    return partials if isinstance(partials, dict) else {}


def _exact_of(values: Mapping[str, float], partials: Mapping[str, Any], key: str) -> list[float]:
    """The archive's exact sum for ``key``: its partials when they are floats that round to its value (else that
    value alone: a key with none, an archive of an earlier version or edited by hand), or [] without a value."""
    value = values.get(key)
    if value is None:
        return []
    parts = partials.get(key)
    if isinstance(parts, list) and parts and all(type(part) is float for part in parts) and _sum(parts) == value:
        return list(parts)
    return [value]


def _accumulate(archive: dict[str, Any], key: str, value: float) -> None:
    """Add ``value`` to the archive's series ``key`` exactly: its partials grow, its value is their sum rounded."""
    values: dict[str, float] = archive["values"]
    parts = _exact_add(_exact_of(values, _partials(archive), key), value)
    values[key] = _sum(parts)
    if len(parts) > 1:
        partials = archive.get(_PARTIALS)
        if not isinstance(partials, dict):
            partials = archive[_PARTIALS] = {}
        partials[key] = parts
    else:  # the rounded value is the exact sum (integers, most of all): nothing more to keep
        partials = archive.get(_PARTIALS)
        if isinstance(partials, dict):
            partials.pop(key, None)


def _exact_add(parts: list[float], value: float) -> list[float]:
    """``parts`` (an expansion: floats of increasing magnitude with no bits in common, whose exact sum is the number
    it stands for) with ``value`` added exactly, as a new expansion. Where something is not finite (an infinite or
    NaN value, or a sum past the largest float), the plain float sum instead, as one part."""
    if not math.isfinite(value) or not all(math.isfinite(part) for part in parts):
        return [_sum([*parts, value])]
    grown: list[float] = []
    carry = value
    for part in parts:
        # Two-sum: with |larger| >= |smaller|, rounded + error is exactly larger + smaller.
        larger, smaller = (carry, part) if abs(carry) >= abs(part) else (part, carry)
        rounded = larger + smaller
        error = smaller - (rounded - larger)
        if error:
            grown.append(error)
        carry = rounded
    grown.append(carry)
    if not math.isfinite(carry):  # overflow: no exact sum in floats
        return [_sum([*parts, value])]
    return grown


#: Integer-valued floats below this add exactly, in any order.
_EXACT_INTEGERS: Final = float(2**53)


def _exact_shares(archive: Mapping[str, Any]) -> dict[str, list[float]]:
    """The exact sums of the archive's keys that have partials: the first shares of their totals in a merge."""
    values: dict[str, float] = archive["values"]
    partials = _partials(archive)
    return {key: _exact_of(values, partials, key) for key in partials if key in values}


def _totals(shares: Mapping[str, list[float]]) -> dict[str, float]:
    """Each key's sum of ``shares``, correctly rounded (see :func:`_sum`)."""
    try:
        return dict(zip(shares, map(math.fsum, shares.values()), strict=True))
    except (OverflowError, ValueError):  # not all finite: those keys as _sum has them
        return {key: _sum(values) for key, values in shares.items()}


def _sum(values: list[float]) -> float:
    """The correctly rounded sum of ``values`` (math.fsum); where that raises (an infinity less another, or a sum
    past the largest float) the plain sum, which is what a float would show: a scrape never fails on it."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        total = 0.0
        for value in values:
            total += value
        return total


class _Closed:
    def write_value(self, key: str, value: float, timestamp: float) -> None:
        pass  # a record after shutdown (e.g. a request finishing late) is dropped, not a crash

    def close(self) -> None:
        pass


# --- instruments ------------------------------------------------------------------------------------------


def _attrs_key(attributes: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(attributes.items())) if attributes else ()


def _key(name: str, field: str, attrs: tuple[tuple[str, Any], ...]) -> str:
    return json.dumps([name, field, attrs], separators=(",", ":"))


class _SharedSum:
    """Counter or up-down counter: ``add(amount, attributes, context=None)``."""

    def __init__(self, state: SharedState, desc: _Descriptor, otel: Any) -> None:
        self._state = state
        self._name = desc.name
        self._field = _COUNTER if desc.kind == "counter" else _GAUGE
        self._otel = otel
        self._keys: dict[tuple[tuple[str, Any], ...], str] = {}

    def add(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        attrs = _attrs_key(attributes)
        key = self._keys.get(attrs)
        if key is None:
            if len(self._keys) >= CARDINALITY_LIMIT:  # as the SDK's limit, per process: see _fold
                attrs = _overflow_of(attributes)
                key = self._keys.get(attrs)
            if key is None:
                key = self._keys[attrs] = _key(self._name, self._field, attrs)
        self._state.add(key, amount)
        if self._otel is not None:
            self._otel.add(amount, attributes, context=context)


class _SharedHistogram:
    """Histogram with OpenTelemetry's bucket rule (a value on a boundary counts in that bucket)."""

    def __init__(self, state: SharedState, desc: _Descriptor, otel: Any) -> None:
        self._state = state
        self._name = desc.name
        self._bounds = list(desc.bounds)
        self._otel = otel
        self._keys: dict[tuple[tuple[str, Any], ...], tuple[list[str], str]] = {}

    def record(self, amount: float, attributes: Mapping[str, Any] | None = None, context: Any = None) -> None:
        attrs = _attrs_key(attributes)
        keys = self._keys.get(attrs)
        if keys is None:
            if len(self._keys) >= CARDINALITY_LIMIT:
                attrs = _overflow_of(attributes)
                keys = self._keys.get(attrs)
            if keys is None:
                buckets = [_key(self._name, f"b{i}", attrs) for i in range(len(self._bounds) + 1)]
                keys = self._keys[attrs] = (buckets, _key(self._name, _SUM, attrs))
        self._state.add_many((keys[0][bisect_left(self._bounds, amount)], keys[1]), (1.0, amount))
        if self._otel is not None:
            self._otel.record(amount, attributes, context=context)


_SPECS: Final = {spec.name: spec for spec in CONTRACT}


class _SharedMeter:
    """Just enough of an OpenTelemetry ``Meter`` for :func:`~llm_telemetry.instruments.create_instruments`."""

    def __init__(
        self, state: SharedState, scope_name: str, scope_version: str, otel_meter: Any, histograms: Histograms | None
    ) -> None:
        self._state = state
        self._otel_meter = otel_meter
        self._histograms = histograms
        state.scope = (scope_name, scope_version)

    def _register(self, desc: _Descriptor) -> None:
        self._state.descriptors[desc.name] = desc

    def create_counter(self, name: str, unit: str = "", description: str = "") -> _SharedSum:
        desc = _Descriptor(name, "counter", unit, description)
        self._register(desc)
        otel = self._otel_meter.create_counter(name, unit=unit, description=description) if self._otel_meter else None
        return _SharedSum(self._state, desc, otel)

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> _SharedSum:
        desc = _Descriptor(name, "updowncounter", unit, description)
        self._register(desc)
        otel = (
            self._otel_meter.create_up_down_counter(name, unit=unit, description=description)
            if self._otel_meter
            else None
        )
        return _SharedSum(self._state, desc, otel)

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> _SharedHistogram:
        bounds = tuple(explicit_bucket_boundaries_advisory or ())
        desc = _Descriptor(name, "histogram", unit, description, bounds)
        self._register(desc)
        otel: Any = None
        if self._otel_meter and self._histograms is not None:
            otel = self._histograms.create(_SPECS[name])
        elif self._otel_meter:
            otel = self._otel_meter.create_histogram(
                name, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(bounds)
            )
        return _SharedHistogram(self._state, desc, otel)


# --- the metrics port -------------------------------------------------------------------------------------


class _Listener:
    """Serves the port from whichever worker binds it first; the others retry quietly in a daemon thread, and say
    so once when the port stays taken with no worker of this server holding it (another service on the port)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, state: SharedState | None = None) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.state = state
        #: Failed attempts in a row while no worker of this server claimed the port; None once reported.
        self._unclaimed: int | None = 0
        self.server: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._try_bind():
            return
        if self.server is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._retry, name="llm-telemetry-metrics-bind", daemon=True)
            self._thread.start()

    def _try_bind(self) -> bool:
        """True when this worker now serves the port, or when retrying is pointless."""
        from .exposition import listener_url, serve_metrics

        try:
            self.server = serve_metrics(self.port, self.host, self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                self._held_elsewhere()  # most often another worker serves it (or will): not an error
                return False
            logger.warning(
                "llm-telemetry: metrics listener not started on %s: %s", listener_url(self.host, self.port, ""), exc
            )
            return True
        if self.state is not None:
            self.state.claim_port()
        logger.info(
            "llm-telemetry: worker %s serves the metrics of all workers on %s",
            os.getpid(),
            listener_url(self.host, self.port),
        )
        return True

    def _held_elsewhere(self) -> None:
        """Count an attempt that found the port taken; report once if no worker of this server has it."""
        if self._unclaimed is None or self.state is None:
            return
        self._unclaimed = 0 if self.state.port_held_by_worker() else self._unclaimed + 1
        if self._unclaimed >= FOREIGN_HOLDER_ATTEMPTS:
            from .exposition import listener_url

            self._unclaimed = None
            logger.warning(
                "llm-telemetry: metrics port %s is held by a process that is not a worker of this server; "
                "this server's metrics are not served until the port is free (set LLM_TELEMETRY_METRICS_PORT to "
                "a free one)",
                listener_url(self.host, self.port, ""),
            )

    def _retry(self) -> None:
        while not self._stop.wait(BIND_RETRY_SECONDS):
            with self._lock:
                if self._stop.is_set() or self._try_bind():
                    return

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BIND_RETRY_SECONDS + 5)
            self._thread = None
        if self.server:
            server, thread = self.server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self.server = None
