"""Who may use the demo: the login (from a flag, a file or the environment), a warning when the demo is open to a
network without one, and a login check that slows password guessing. Standard library only; no gradio import.

A password given as `--auth USER:PASS` is visible to every user of the machine (`ps`, /proc/<pid>/cmdline) and lands
in shell history; `--auth-file PATH` or the TUNEFORGE_DEMO_AUTH environment variable keep it out of both.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from serve.errors import ServeError

logger = logging.getLogger(__name__)

AUTH_ENV = "TUNEFORGE_DEMO_AUTH"


def demo_auth(auth: str | None = None, auth_file: str | Path | None = None,
              environ: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The (user, password) the demo requires: `--auth USER:PASS`, else the first line of `--auth-file`, else
    $TUNEFORGE_DEMO_AUTH; None when none is set. The password may contain ':' (split at the first one)."""
    if auth is not None and auth_file is not None:
        raise ServeError("give the login once: --auth USER:PASS or --auth-file PATH, not both")
    if auth is not None:
        logger.warning("--auth puts the password on the command line, where other users of this machine can read it "
                       "(ps); prefer --auth-file PATH or $%s", AUTH_ENV)
        return _parse(auth, "--auth")
    if auth_file is not None:
        path = Path(auth_file)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ServeError(f"cannot read the login file {path} ({type(err).__name__}); give a text file whose first "
                             "line is USER:PASS") from None
        return _parse(lines[0] if lines else "", f"the first line of {path}")
    if environ.get(AUTH_ENV):
        return _parse(environ[AUTH_ENV], f"${AUTH_ENV}")
    return None


def _parse(value: str, where: str) -> tuple[str, str]:
    user, sep, password = value.strip("\r\n").partition(":")
    if not sep or not user.strip() or not password:
        raise ServeError(f"{where} must be USER:PASS (both non-empty)")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def warn_if_exposed(host: str, share: bool, auth: tuple[str, str] | None) -> None:
    """Log a warning when people on a network can reach the demo and no login is required."""
    if auth is not None:
        return
    if share:
        logger.warning("--share without a login: anyone with the gradio.live link can use this demo and upload files; "
                       "set --auth-file PATH or $%s", AUTH_ENV)
    elif not is_loopback(host):
        logger.warning("the demo listens on %s without a login: anyone who can reach this machine can use it and "
                       "upload files; set --auth-file PATH or $%s, or listen on 127.0.0.1", host, AUTH_ENV)


class LoginThrottle:
    """The demo's login check (gradio's `auth` accepts it: pass `throttle.check`) for one user, slowed for guessers.

    A failed login is answered after `delay_s`, and failures are handled one at a time for the whole server: parallel
    guesses queue up, so at most 1 / delay_s guesses a second get an answer (Gradio's own check answers ~100 a
    second). After `max_failures` failures in a row, every login (the right one too) is refused for `lockout_s`
    seconds, with a warning in the log. A successful login resets the count. Names and passwords are compared in
    constant time. `check` is a coroutine, so the waits never block the server's event loop.
    """

    def __init__(self, user: str, password: str, *, delay_s: float = 1.0, max_failures: int = 10,
                 lockout_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self._user, self._password = _bytes(user), _bytes(password)
        self.delay_s, self.max_failures, self.lockout_s, self.clock = delay_s, max_failures, lockout_s, clock
        self.failures = 0  # in a row
        self.locked_until = 0.0  # clock() time
        self._lock = asyncio.Lock()

    async def check(self, username: str, password: str) -> bool:
        """True for the right user and password while not locked out."""
        if self.clock() < self.locked_until:
            return False
        # Both compared every time (no early exit on a wrong name), so the answer's timing tells nothing.
        right = hmac.compare_digest(_bytes(username), self._user) & hmac.compare_digest(_bytes(password),
                                                                                        self._password)
        if right:
            self.failures = 0
            return True
        async with self._lock:
            await asyncio.sleep(self.delay_s)
            self.failures += 1
            if self.failures >= self.max_failures:
                self.failures, self.locked_until = 0, self.clock() + self.lockout_s
                logger.warning("%d failed logins in a row: every login is refused for the next %.0f s",
                               self.max_failures, self.lockout_s)
        return False


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")
