"""The watcher (``nvmgr reconcile --all --watch``) as a background process, for e2e tests."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

from . import vmlib


class Watcher:
    """A running watcher whose stdout and stderr lines are read as they come."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen([vmlib.NVMGR, "reconcile", "--all", "--watch", *extra],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                         for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()

    def _read(self, stream: object, which: str) -> None:
        for line in stream:  # type: ignore[attr-defined]
            (self.out if which == "out" else self.err).append(line.rstrip("\n"))
            self.lines.put((which, line.rstrip("\n")))

    def wait_line(self, needle: str, *, stream: str | None = None, timeout: float = 60) -> str:
        """The first line (from now on, or already read) containing *needle*."""
        deadline = time.monotonic() + timeout
        for line in (self.out if stream == "out" else self.err if stream == "err"
                     else self.out + self.err):
            if needle in line:
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise vmlib.Failed(f"the watcher never said {needle!r}; it said:\n"
                                   + "\n".join(self.out + self.err))
            with contextlib.suppress(queue.Empty):
                which, line = self.lines.get(timeout=min(left, 0.5))
                if needle in line and stream in (None, which):
                    return line
            if self.proc.poll() is not None and self.lines.empty():
                raise vmlib.Failed(f"the watcher exited ({self.proc.returncode}) before "
                                   f"saying {needle!r}:\n" + "\n".join(self.out + self.err))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then its exit status (SIGKILL after *timeout*: a failure)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise vmlib.Failed("the watcher did not stop on SIGTERM") from None
        for t in self._readers:
            t.join(5)
        return self.proc.returncode


@contextlib.contextmanager
def watching(*extra: str, ready: Sequence[str] = ("watching libvirt",)) -> Iterator[Watcher]:
    w = Watcher(*extra)
    try:
        for needle in ready:
            w.wait_line(needle, stream="err", timeout=60)
        yield w
    finally:
        code = w.stop()
        print("\n".join(w.out + w.err))
        assert not any("Traceback" in line for line in w.err), w.err
        assert code == 0, (code, w.err)
