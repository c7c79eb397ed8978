"""Who may use the server and what it may read.

- `ApiKeyAuth`: an ASGI middleware that answers 401 (OpenAI's error shape, `WWW-Authenticate:
  Bearer`) to every request but `/health` without `Authorization: Bearer KEY`. It wraps the
  whole app, so routes added later (the OpenAI endpoints) are covered without a change.
- `check_bind`: without a key the server listens on a loopback address only, unless the
  operator says `--insecure` (e.g. behind an authenticating proxy).
- `LoadRoots`: `POST /v1/adapters` reads only under the adapter roots (`--adapters` and
  `--allow-load-from`), judged on real paths (symlinks resolved), for the directory and for every
  file a load reads. Every path outside gets one 403 message, whether it exists or not.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ...core.bank import valid_name
from ...core.errors import ConfigError
from .engine import RequestError

API_KEY_ENV = "PEFTLAB_API_KEY"
OPEN_PATHS = frozenset({"/health"})   # answered without a key: liveness probes carry none

NO_KEY = ("this server needs an API key: send the header 'Authorization: Bearer KEY' with the key "
          f"it was started with (--api-key or {API_KEY_ENV})")
WRONG_KEY = ("the API key is not valid for this server: send 'Authorization: Bearer KEY' with the "
             f"key it was started with (--api-key or {API_KEY_ENV})")
OUTSIDE_ROOTS = ("the server loads adapters only from under its adapter folders (--adapters DIR and "
                 "any --allow-load-from DIR given when it started; real paths, symlinks resolved) "
                 "and this path is not under them: copy the adapter into one of them, or restart "
                 "the server with --allow-load-from on the folder that holds it")
NO_ROOTS = ("this server loads no adapters by path: it was started without --adapters DIR or "
            "--allow-load-from DIR; restart it with one of them, and load adapters from under "
            "that folder")


# ---- authentication -----------------------------------------------------------------------------
def check_api_key(key: str | None) -> str | None:
    """`key` when it can travel in an HTTP header (printable ASCII, no spaces); ConfigError for
    an empty or unusable key."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or not key.isascii() or not key.isprintable() or " " in key:
        raise ConfigError(f"the API key must be a non-empty string of printable ASCII without spaces "
                          f"(it travels in the header 'Authorization: Bearer KEY'); got "
                          f"{'an empty string' if key == '' else 'another value'}")
    return key


def api_key_from(option: str | None) -> str | None:
    """The server's key: the `--api-key` option, else the PEFTLAB_API_KEY environment variable
    (empty or unset: no key). ConfigError for an unusable key."""
    if option is not None:
        return check_api_key(option)
    return check_api_key(os.environ.get(API_KEY_ENV) or None)


def openai_error(status: int, message: str, *, type_: str, code: str | None) -> JSONResponse:
    """An error answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status)


class ApiKeyAuth:
    """ASGI middleware: every request but those to `open_paths` needs `Authorization: Bearer
    <key>`; others get 401 before the app (or the body-size limit) sees them. The key is
    compared in constant time on SHA-256 digests, so neither its bytes nor its length leak
    through timing."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Iterable[str] = OPEN_PATHS) -> None:
        self.app = app
        self._digest = hashlib.sha256(check_api_key(api_key).encode()).digest()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        problem = self._problem(scope["headers"])
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})   # policy violation
        else:
            answer = openai_error(401, problem, type_="invalid_request_error", code="invalid_api_key")
            answer.headers["WWW-Authenticate"] = "Bearer"
            await answer(scope, receive, send)

    def _problem(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """None when the request carries the key, else what the 401 says."""
        given = [value for name, value in headers if name.lower() == b"authorization"]
        if not given:
            return NO_KEY
        scheme, _, token = given[0].strip().partition(b" ")
        token = token.strip()
        if len(given) > 1 or scheme.lower() != b"bearer" or not token:
            return WRONG_KEY
        ok = hmac.compare_digest(hashlib.sha256(token).digest(), self._digest)
        return None if ok else WRONG_KEY


# ---- where the server listens -------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:   # another host name: it may resolve to any interface
        return False


def check_bind(host: str, *, api_key: str | None, insecure: bool) -> None:
    """ConfigError, before anything is loaded, when the server would listen beyond this machine
    without a key and without `insecure`."""
    if api_key is not None or insecure or is_loopback(host):
        return
    raise ConfigError(
        f"--host {host or '(all interfaces)'} would serve beyond this machine without authentication: "
        "anyone who can reach it could generate with the model and load adapters. Give an API key "
        f"(--api-key KEY, or the environment variable {API_KEY_ENV}; every request but /health then "
        "needs 'Authorization: Bearer KEY'), or keep the default --host 127.0.0.1, or pass --insecure "
        "to serve without a key anyway (e.g. behind a proxy that authenticates)")


# ---- where adapters may be loaded from ----------------------------------------------------------
class LoadRoots:
    """The folders `POST /v1/adapters` may read from, as real paths. `confine(path)` is the real
    path of `path` when it lies under one of them, else RequestError 403 with one message for
    every outside path (whether it exists, is a symlink or is not there at all)."""

    def __init__(self, roots: Iterable[str | Path]) -> None:
        self.roots: list[Path] = []
        for root in roots:
            real = Path(os.path.realpath(Path(root).expanduser()))
            if not real.is_dir():
                raise ConfigError(f"adapter folder {root} does not exist or is not a directory; give "
                                  "an existing folder to --adapters / --allow-load-from")
            if real not in self.roots:
                self.roots.append(real)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def confine(self, path: str | Path) -> Path:
        """The real path of `path` (relative: to the server's working directory), when it is one
        of the roots or under one; RequestError 403 otherwise. Resolving reads no file: symlinks
        only, so an outside path is refused before anything there is read."""
        if not self.roots:
            raise RequestError(403, NO_ROOTS)
        try:
            real = os.path.realpath(Path(path).expanduser())
        except (ValueError, OSError, RuntimeError):   # a NUL byte, a symlink loop
            raise RequestError(403, OUTSIDE_ROOTS) from None
        for root in self.roots:
            if os.path.commonpath([real, root]) == str(root):
                return Path(real)
        raise RequestError(403, OUTSIDE_ROOTS)

    def check(self, path: Path) -> None:
        """RequestError 403 unless `path` resolves under a root (for the bank's file checks)."""
        self.confine(path)


def check_adapter_name(name: str) -> str:
    """`name` when it can name an adapter; ValueError (a 422 in a request body) naming the rule:
    no path separators, dots ('..'), colons, spaces or control characters."""
    if not valid_name(name):
        raise ValueError(f"adapter name {name!r} is not usable: give a non-empty name without '.', "
                         "':', '/', '\\', spaces or control characters that is no torch module "
                         "attribute (e.g. 'sentiment_v2')")
    return name
