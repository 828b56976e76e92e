"""Keeps native libraries' log spam off the terminal (``--verbose`` shows it).

mediapipe's C++ graphs, TensorFlow Lite and absl write straight to file descriptor 2 on every
start ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "WARNING: All log messages
before absl::InitializeLog() is called are written to STDERR", ``W0000 … file.cc:114] …``).  No
environment variable silences all of them (mediapipe 0.10.21 ignores ``GLOG_minloglevel``; absl
logs before anyone could configure it), so :func:`native_log_filter` puts a pipe on fd 2 for the
length of a command and a thread copies every line to the real stderr except those informational
native lines.  Errors (absl/glog ``E``/``F`` lines) and everything Python writes pass unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Iterator

NOISE = re.compile(
    rb"^(?:INFO: "                                              # TensorFlow Lite's info lines
    rb"|WARNING: All log messages before absl::InitializeLog\(\)"
    rb"|[IW]\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] )")                # absl/glog info + warnings
"""Lines dropped from fd 2: native informational logs only."""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:        # the real stderr is gone (closed terminal): nothing to do
            return
        data = data[n:]


def _pump(read_fd: int, out_fd: int) -> None:
    """Copy ``read_fd`` to ``out_fd`` line by line, without :data:`NOISE` lines."""
    buf = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        keep = b"".join(line + b"\n" for line in lines if not NOISE.match(line))
        if b"\r" in buf:       # a progress bar redrawing its line: show it now
            cut = buf.rindex(b"\r") + 1
            keep, buf = keep + buf[:cut], buf[cut:]
        if keep:
            _write_all(out_fd, keep)
    if buf and not NOISE.match(buf):
        _write_all(out_fd, buf)
    os.close(read_fd)


@contextlib.contextmanager
def native_log_filter(enabled: bool = True, fd: int = 2) -> Iterator[None]:
    """While inside, lines matching :data:`NOISE` written to ``fd`` (any thread, any library)
    are dropped; on exit ``fd`` is restored and what was written has been passed on.

    Also asks glog/TensorFlow for warnings and up only (``GLOG_minloglevel``,
    ``TF_CPP_MIN_LOG_LEVEL``; the user's own values win), which helps builds that honour them.
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        saved = os.dup(fd)
        r, w = os.pipe()
    except OSError:            # no fd 2 (a daemon without stderr): nothing to filter
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(w, fd)
    os.close(w)
    pump = threading.Thread(target=_pump, args=(r, saved), name="stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, fd)     # drops our write end: the pump sees EOF and drains
        pump.join(timeout=2.0)
        if not pump.is_alive():
            # Still alive = a child process holds the pipe open; keep ``saved`` open rather than
            # let its number be reused under the pump.
            os.close(saved)
