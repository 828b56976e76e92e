"""systemd integration: sd_notify over $NOTIFY_SOCKET (READY, WATCHDOG, STOPPING, RELOADING, STATUS).

A few lines of stdlib instead of a dependency: the protocol is one datagram per message to a Unix
socket whose path comes from the environment (a leading "@" means the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages when running under systemd (Type=notify); a no-op otherwise."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._addr = env.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        if self._addr:
            addr = "\0" + self._addr[1:] if self._addr.startswith("@") else self._addr
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.connect(addr)
            except OSError as e:
                log.warning("NOTIFY_SOCKET=%s unusable (%s); systemd notifications off", self._addr, e)
                self._sock = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and ours else 0.0
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        """True when a notify socket is connected."""
        return self._sock is not None

    def send(self, *lines: str) -> None:
        """Send one message made of KEY=VALUE lines; errors are logged, never raised."""
        if self._sock is None:
            return
        try:
            self._sock.send("\n".join(lines).encode())
        except OSError as e:
            log.warning("sd_notify failed: %s", e)

    def ready(self, status: str = "running") -> None:
        """READY=1: warm-up done, the clock is running."""
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown began."""
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic timestamp systemd ≥ 253 expects."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def status(self, text: str) -> None:
        """STATUS=…: shown by systemctl status."""
        self.send(f"STATUS={text}")

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 at most every half watchdog period; call from the clock task, so a stalled
        clock stops the pings and systemd restarts the service."""
        if self.watchdog_s and now - self._last_ping >= self.watchdog_s / 2:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
