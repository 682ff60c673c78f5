"""Shards behind a URL or a ``pipe:`` command, fetched whole into a local cache for the random-access loader.

A shard base (``data.shards``, ``evaluate.py --data``) is a local folder, an ``http://``/``https://`` URL, an
fsspec URL (``s3://``, ``gs://``, ... with the matching backend installed: ``pip install -e .[remote]``) or a
``pipe:`` command template whose ``{}`` is replaced by the file name (``pipe:aws s3 cp s3://bucket/mimic/{} -``).
``dataset.json`` and the shard names are resolved against it (:func:`join`).

The loader reads samples by random access, so a remote shard is downloaded whole (MosaicML-style) by
:class:`ShardCache` into a cache folder and then read like a local file:

- atomic: a download goes to a temporary file in the cache folder, which is then linked (or renamed) into
  place, so a reader never sees half a shard; loader workers and ranks on one node share the folder and a
  per-shard lock file (``flock``) makes one of them download while the others wait, then use its file;
- bounded: after each download the least recently used shards (access time, set on every use) are evicted
  until the folder holds at most ``max_bytes``, never a shard this process is using (pinned since its
  last :meth:`ShardCache.release`); a shard another process still reads stays readable through its open
  file (POSIX unlink) and is fetched again when next needed;
- faults: a connection that fails, is cut short (fewer bytes than ``Content-Length``, a pipe command that
  exits non-zero) or stalls longer than ``timeout_s`` on one read is retried ``retries`` times with
  exponential back-off, then :class:`FetchError` (an ``OSError``) names the URL and the reason; the loader
  counts the shard's positions as lost, like those of an unreadable local shard.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

# Defaults of DataConfig's cache_max_bytes, fetch_timeout_s and fetch_retries.
DEFAULT_MAX_BYTES = 64 * 2**30
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
BACKOFF_S = 1.0  # first retry delay; doubled per retry, at most BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
CHUNK = 1 << 20

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class FetchError(OSError):
    """A URL or pipe command that could not be read (after retries): names the URL and the reason."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot fetch {url}: {reason}")
        self.url, self.reason = url, reason

    def __reduce__(self) -> Any:  # picklable across loader workers
        return (FetchError, (self.url, self.reason))


def is_remote(base: str | os.PathLike[str]) -> bool:
    """True for a ``pipe:`` command template or a ``scheme://`` URL; False for a local path."""
    text = str(base)
    return text.startswith("pipe:") or _URL.match(text) is not None


def join(base: str | os.PathLike[str], name: str) -> str:
    """``name`` (a shard or ``dataset.json``) resolved against the base: a path, a URL, or a pipe command."""
    text = str(base)
    if text.startswith("pipe:"):
        if "{}" not in text:
            raise ValueError(f"pipe: shard base {text!r} has no {{}} for the file name")
        return text.replace("{}", name)
    if _URL.match(text):
        return text + name if text.endswith("/") else f"{text}/{name}"
    return str(Path(text) / name)


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    match = _URL.match(url)
    return match.group(1).lower() if match else "file"


@contextlib.contextmanager
def _open_stream(url: str, timeout_s: float) -> Iterator[tuple[Callable[[], bytes], int | None]]:
    """(read one chunk, expected size or None) of ``url``; a read that waits longer than ``timeout_s`` raises."""
    scheme = _scheme(url)
    if scheme == "pipe":
        errors = tempfile.TemporaryFile()  # not a pipe: a chatty command must not block on a full stderr pipe
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=errors,
                                   start_new_session=True)
        assert process.stdout is not None
        fd = process.stdout.fileno()

        def read_pipe() -> bytes:
            ready, _, _ = select.select([fd], [], [], timeout_s)
            if not ready:
                raise TimeoutError(f"no data for {timeout_s:g} s")
            return os.read(fd, CHUNK)

        try:
            yield read_pipe, None
            status = process.wait(timeout=timeout_s)
            if status != 0:
                errors.seek(0)
                stderr = errors.read(2000).decode(errors="replace").strip()
                raise OSError(f"command exited with status {status}" + (f": {stderr}" if stderr else ""))
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            process.stdout.close()
            errors.close()
    elif scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "mlip_dist"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # timeout: connect and each read
            length = response.headers.get("Content-Length")
            yield (lambda: response.read(CHUNK)), (int(length) if length and length.isdigit() else None)
    else:
        try:
            import fsspec
        except ImportError as exc:
            raise OSError(f"{scheme}:// needs fsspec and its backend: pip install -e .[remote]") from exc
        options: dict[str, Any] = {}
        if scheme in ("s3", "s3a"):
            options = {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                         "retries": {"max_attempts": 1}}}
        elif scheme in ("gs", "gcs"):
            options = {"timeout": timeout_s}
        try:
            try:
                opened = fsspec.open(url, "rb", **options)
            except TypeError:  # a backend version without these options: its own timeouts
                opened = fsspec.open(url, "rb")
        except ImportError as exc:
            raise OSError(f"no fsspec backend for {scheme}:// ({exc}): pip install -e .[remote]") from exc
        with opened as handle:
            size = getattr(handle, "size", None)
            yield (lambda: handle.read(CHUNK)), (int(size) if isinstance(size, int) else None)


def _copy(url: str, sink: BinaryIO, timeout_s: float) -> int:
    """Copy ``url`` into ``sink`` once; raises on any failure, a cut transfer included."""
    written = 0
    with _open_stream(url, timeout_s) as (read, expected):
        while True:
            chunk = read()
            if not chunk:
                break
            sink.write(chunk)
            written += len(chunk)
    if expected is not None and written != expected:
        raise OSError(f"connection closed after {written} of {expected} bytes")
    return written


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _retrying(url: str, attempt_once: Callable[[], Any], retries: int, backoff_s: float) -> Any:
    """``attempt_once()`` up to ``retries + 1`` times with exponential back-off; then FetchError."""
    for attempt in range(retries + 1):
        try:
            return attempt_once()
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport failure is retried, then reported
            reason = _describe(exc)
            permanent = isinstance(exc, urllib.error.HTTPError) and exc.code in (401, 403, 404, 410)
            if permanent or attempt == retries:
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                raise FetchError(url, f"{reason} ({tries})") from exc
            delay = min(BACKOFF_MAX_S, backoff_s * 2**attempt)
            logger.warning("fetching %s failed (%s): retry %d of %d in %.2g s", url, reason, attempt + 1, retries,
                           delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, timeout_s: float | None = None, retries: int | None = None,
               backoff_s: float | None = None) -> bytes:
    """The whole content of a URL, pipe command or local path; FetchError (with the URL) when unreachable.
    Settings not given come from :func:`configure`."""
    timeout_s = _settings["timeout_s"] if timeout_s is None else timeout_s
    retries = _settings["retries"] if retries is None else retries
    backoff_s = _settings["backoff_s"] if backoff_s is None else backoff_s
    if not is_remote(url):
        try:
            return Path(url).read_bytes()
        except OSError as exc:
            raise FetchError(url, _describe(exc)) from exc

    def once() -> bytes:
        import io

        sink = io.BytesIO()
        _copy(url, sink, timeout_s)
        return sink.getvalue()

    return _retrying(url, once, retries, backoff_s)


def read_text(url: str, timeout_s: float | None = None, retries: int | None = None,
              backoff_s: float | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (for ``dataset.json``)."""
    return read_bytes(url, timeout_s, retries, backoff_s).decode("utf-8")


_settings: dict[str, Any] = {"cache_dir": None, "max_bytes": DEFAULT_MAX_BYTES, "timeout_s": DEFAULT_TIMEOUT_S,
                             "retries": DEFAULT_RETRIES, "backoff_s": BACKOFF_S}


def configure(*, cache_dir: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES,
              timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
              backoff_s: float = BACKOFF_S) -> None:
    """Set this process's defaults for :func:`cache_for` and the loader/evaluation helpers that are not given
    cache settings explicitly (validation, evaluation)."""
    _settings.update(cache_dir=cache_dir, max_bytes=max_bytes, timeout_s=float(timeout_s), retries=int(retries),
                     backoff_s=float(backoff_s))


def configure_from(data: Any) -> None:
    """:func:`configure` from a ``DataConfig`` (``cache_dir``, ``cache_max_bytes``, ``fetch_timeout_s``,
    ``fetch_retries``)."""
    configure(cache_dir=data.cache_dir, max_bytes=data.cache_max_bytes, timeout_s=data.fetch_timeout_s,
              retries=data.fetch_retries)


def settings() -> dict[str, Any]:
    """This process's defaults (see :func:`configure`)."""
    return dict(_settings)


def default_cache_root() -> Path:
    """Where caches go without ``data.cache_dir``: a folder of this user in the system temp folder, shared by
    the ranks and loader workers of a node (each shard is downloaded once per node)."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"mlip_dist-shard-cache-{user}"


class ShardCache:
    """Whole-shard downloads of remote shards into ``cache_dir``; see the module docstring.

    ``local_path(url)`` returns the local copy (downloading it when absent) and pins it until ``release``.
    Picklable: loader workers get a copy that shares the folder.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], max_bytes: int | None = DEFAULT_MAX_BYTES,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES, backoff_s: float = BACKOFF_S):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.downloads = 0  # shards this process downloaded (benchmarks, tests)
        self._pinned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pinned"], state["downloads"] = set(), 0
        return state

    def file_name(self, url: str) -> str:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        tail = url
        if url.startswith("pipe:"):  # the last argument that is not "-": the source file
            try:
                tail = ([t for t in shlex.split(url[len("pipe:"):]) if t != "-"] or [""])[-1]
            except ValueError:
                tail = ""
        tail = tail.rstrip("/").rsplit("/", 1)[-1]
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail)[-64:]
        return f"{digest}-{tail}" if tail else digest

    def release(self) -> None:
        """Unpin every shard handed out so far (they may be evicted again)."""
        self._pinned.clear()

    def local_path(self, url: str) -> Path:
        """The local copy of ``url``, downloaded when absent; raises FetchError when it cannot be fetched."""
        path = self.cache_dir / self.file_name(url)
        self._pinned.add(path.name)
        if self._touch(path):
            return path
        lock_path = self.cache_dir / f".{path.name}.lock"
        with self._lock(lock_path):
            if self._touch(path):  # another worker or rank fetched it while this one waited
                return path
            _retrying(url, lambda: self._download(url, path), self.retries, self.backoff_s)
        self._evict()
        return path

    @staticmethod
    def _touch(path: Path) -> bool:
        """Mark ``path`` as just used (access time; the modification time, part of a shard's identity for the
        reader, is kept); False when it is not there."""
        try:
            stat = os.stat(path)
            os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
            return True
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def _lock(self, lock_path: Path) -> Iterator[None]:
        """An exclusive ``flock`` on ``lock_path`` while it downloads; a waiter gives up waiting after a while
        (a holder that is very slow) and downloads too (the temp-then-link pattern keeps that safe)."""
        try:
            import fcntl
        except ImportError:  # no flock: concurrent downloads stay safe, only duplicated
            yield
            return
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + (self.retries + 1) * (self.timeout_s + BACKOFF_MAX_S)
            locked = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            yield
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _download(self, url: str, path: Path) -> None:
        fd, temp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as sink:
                _copy(url, sink, self.timeout_s)
            try:
                os.link(temp, path)  # fails when another process put it there first: keep that one
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system
                os.replace(temp, path)
            self.downloads += 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _evict(self) -> None:
        """Delete least recently used shards until the folder holds at most ``max_bytes`` (pinned ones stay)."""
        if self.max_bytes is None:
            return
        entries = []
        total = 0
        stale = time.time() - 2 * self.timeout_s - 600  # a live download writes at least every timeout_s
        with os.scandir(self.cache_dir) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    if entry.name.endswith(".part"):  # left by a killed process
                        with contextlib.suppress(OSError):
                            if entry.stat().st_mtime < stale:
                                os.unlink(entry.path)
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                total += stat.st_size
                entries.append((stat.st_atime_ns, entry.name, stat.st_size))
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if name in self._pinned:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cache_dir / name)
                logger.debug("shard cache %s: evicted %s (%d bytes)", self.cache_dir, name, size)
            total -= size


def cache_for(base: str | os.PathLike[str], *, dataset_json: str = "", cache_dir: str | None = None,
              max_bytes: int | None = None, timeout_s: float | None = None, retries: int | None = None,
              backoff_s: float | None = None) -> ShardCache | None:
    """The shard cache of a remote base (None for a local folder, read in place); settings not given come
    from :func:`configure`.

    Its folder is ``<cache_dir or default_cache_root()>/<digest of the base and dataset.json>``: the same for
    every rank and worker of a node, and a new one when the shards are re-packed (another ``dataset.json``), so
    a cache never serves a stale shard.
    """
    if not is_remote(base):
        return None
    digest = hashlib.sha256(f"{base}\n{dataset_json}".encode()).hexdigest()[:16]
    cache_dir = cache_dir if cache_dir is not None else _settings["cache_dir"]
    root = Path(cache_dir) if cache_dir else default_cache_root()
    return ShardCache(root / digest,
                      max_bytes=max_bytes if max_bytes is not None else _settings["max_bytes"],
                      timeout_s=timeout_s if timeout_s is not None else _settings["timeout_s"],
                      retries=retries if retries is not None else _settings["retries"],
                      backoff_s=backoff_s if backoff_s is not None else _settings["backoff_s"])
