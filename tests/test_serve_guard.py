"""The server's guards (issue 23, items 2, 3 and acceptance 2, 3, 5): with an API key every route
but /health answers 401 without `Authorization: Bearer KEY` (real uvicorn, routes added after
create_app included); without a key it refuses a non-loopback host unless --insecure;
POST /v1/adapters loads only from under the adapter roots (real paths: escaping symlinks, for
the directory or any file in it, are refused with one 403), adapter names are validated (422),
nothing is loaded by a refused request and the server keeps serving; and `peftlab serve` with no
--adapters starts a base-only server whose POSTed adapter answers as the adapter does alone."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from test_reliability_server import server_uvicorn
from test_serve import (  # noqa: F401
    LIMIT,
    PROMPTS,
    clients,
    lm_adapters,
    lm_client,
    pytestmark,
    reference,
    tiny_lm,
    tok,
)

import peftlab
from peftlab.apps.cli import main
from peftlab.apps.serve import Engine, create_app, serve
from peftlab.apps.serve.guard import NO_ROOTS, OUTSIDE_ROOTS, is_loopback
from peftlab.core.bank import AdapterBank
from peftlab.core.errors import ConfigError
from peftlab.core.io import CONFIG_FILE, TENSORS_FILE

KEY = "sk-test-0123456789abcdef"
SRC = Path(__file__).resolve().parents[1] / "src"


def lm_engine(tok, root: Path | None) -> Engine:
    am = peftlab.adapt(tiny_lm(tok))
    return Engine(am, tok, AdapterBank(am, root, max_adapters=2), model_name="tiny",
                  max_new_tokens=LIMIT, max_input_tokens=60)


def every_route(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route the app has, path parameters filled in, plus a path it
    does not have: the key must guard them all, whoever added them."""
    out = [("GET", "/no/such/route")]
    for route in app.routes:
        path = route.path.replace("{name}", "x")
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                out.append((method, path))
    return out


# ---- authentication -------------------------------------------------------------------------------
def test_the_api_key_guards_every_route_but_health(tok, lm_adapters, reference):
    app = create_app(lm_engine(tok, lm_adapters), api_key=KEY)

    @app.get("/v1/models")   # a route added after create_app, as add_openai_routes does
    def models() -> dict:
        return {"object": "list", "data": []}

    routes = every_route(app)
    assert {("GET", "/v1/models"), ("POST", "/v1/generate"), ("POST", "/v1/adapters"),
            ("DELETE", "/v1/adapters/x"), ("GET", "/openapi.json"), ("GET", "/docs")} <= set(routes)
    bad_headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
                   {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Basic {KEY}"},
                   {"Authorization": "Bearer"}, {"Authorization": f"Token {KEY}"}, {"X-Api-Key": KEY}]
    with server_uvicorn(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200   # no key: liveness probes carry none
        for method, path in routes:
            if path == "/health":
                continue
            for headers in bad_headers:
                r = client.request(method, path, headers=headers, json={"prompt": "hi"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, error
                assert error["code"] == "invalid_api_key" and error["param"] is None
                assert error["type"] == "invalid_request_error" and "Authorization: Bearer" in error["message"]
                assert KEY not in r.text
        # a body is not read before the key is checked: 401, not 413
        huge = client.post("/v1/generate", content=b"x" * (2**20 + 1))
        assert huge.status_code == 401
        # the right key (any case of "Bearer"): 200, with the adapter's own answer
        for scheme in ("Bearer", "bearer"):
            auth = {"Authorization": f"{scheme} {KEY}"}
            assert client.get("/v1/models", headers=auth).status_code == 200
            assert client.get("/v1/adapters", headers=auth).status_code == 200
            assert client.get("/openapi.json", headers=auth).status_code == 200
            r = client.post("/v1/generate", headers=auth, json={"prompt": PROMPTS[0], "adapter": "alpha"})
            assert r.status_code == 200 and r.json()["text"] == reference("alpha", PROMPTS[0])[0]
        r = client.post("/v1/adapters", headers=auth, json={"name": "extra", "path": str(lm_adapters / "beta")})
        assert r.status_code == 200 and r.json()["loaded"] == ["alpha", "extra"]
        assert client.delete("/v1/adapters/extra", headers=auth).status_code == 200


def test_without_a_key_every_route_stays_open(tok, lm_adapters, clients):
    client = lm_client(clients, tok, lm_adapters)
    assert client.get("/v1/adapters").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_bad_keys_are_refused_when_the_app_is_made(tok, lm_adapters):
    engine = lm_engine(tok, lm_adapters)
    for key in ("", "two words", "tab\tkey", "clé"):
        with pytest.raises(ConfigError, match="printable ASCII without spaces"):
            create_app(engine, api_key=key)


# ---- where the server listens ---------------------------------------------------------------------
def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.2", "example.com"]))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com"])
def test_cli_refuses_a_public_host_without_a_key(host, capsys, monkeypatch):
    monkeypatch.delenv("PEFTLAB_API_KEY", raising=False)
    started = time.perf_counter()
    assert main(["serve", "--model", "smollm2", "--host", host]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 5   # refused before any model loads
    assert f"--host {host or '(all interfaces)'} would serve beyond this machine without authentication" in err
    assert "--api-key KEY" in err and "PEFTLAB_API_KEY" in err and "--insecure" in err


def test_cli_passes_the_bind_check_with_a_key_or_insecure(capsys, monkeypatch, tmp_path):
    # Each start goes past the bind check and stops at the next bad option, before loading a model.
    monkeypatch.delenv("PEFTLAB_API_KEY", raising=False)
    bad = ["--max-batch-size", "0"]
    for extra in (["--api-key", KEY], ["--insecure"], []):
        if not extra:
            monkeypatch.setenv("PEFTLAB_API_KEY", KEY)
        assert main(["serve", "--model", "smollm2", "--host", "0.0.0.0", *extra, *bad]) == 2
        assert "--max-batch-size must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--model", "smollm2", "--host", "0.0.0.0", "--api-key", "a b"]) == 2
    assert "printable ASCII without spaces" in capsys.readouterr().err
    assert main(["serve", "--host", "127.0.0.1"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["serve", "--model", "smollm2", "--allow-load-from", str(tmp_path / "nope")]) == 2
    assert "does not exist or is not a directory" in capsys.readouterr().err


def test_serve_refuses_a_public_host_without_a_key(tok, lm_adapters):
    with pytest.raises(ConfigError, match="without authentication"):
        serve(lm_engine(tok, lm_adapters), host="0.0.0.0")


# ---- confined loading -----------------------------------------------------------------------------
def escape_fixture(lm_adapters: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(root, outside): a root of adapters holding symlinks that leave it (the directory itself,
    a run directory's `last`, one file inside an adapter) and one that stays inside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(lm_adapters, root)
    outside.mkdir()
    shutil.copytree(lm_adapters / "beta", outside / "beta")
    (root / "escape").symlink_to(outside / "beta", target_is_directory=True)
    (root / "run").mkdir()
    (root / "run" / "last").symlink_to(outside / "beta", target_is_directory=True)
    (root / "file_escape").mkdir()
    shutil.copy(lm_adapters / "beta" / CONFIG_FILE, root / "file_escape")
    (root / "file_escape" / TENSORS_FILE).symlink_to(outside / "beta" / TENSORS_FILE)
    (root / "config_escape").mkdir()
    (root / "config_escape" / CONFIG_FILE).symlink_to(outside / "beta" / CONFIG_FILE)
    shutil.copy(lm_adapters / "beta" / TENSORS_FILE, root / "config_escape")
    (root / "inner").symlink_to(root / "gamma", target_is_directory=True)
    return root, outside


def test_loading_is_confined_to_the_roots(tok, lm_adapters, reference, clients, tmp_path, caplog):
    root, outside = escape_fixture(lm_adapters, tmp_path)
    client = lm_client(clients, tok, root)
    read_before = {p: p.stat().st_atime_ns for p in (outside / "beta").iterdir()}
    refused = [outside / "beta", outside / "missing", root / "escape", root / "run",
               root / "file_escape", root / "config_escape", root / ".." / "outside" / "beta",
               str(root / "nope" / ".." / ".." / "outside" / "beta"), "/etc", "/etc/passwd",
               "/nonexistent", "relative/elsewhere", "~"]
    details = set()
    for path in refused:
        r = client.post("/v1/adapters", json={"name": "x", "path": str(path)})
        assert r.status_code == 403, (path, r.status_code, r.text)
        details.add(r.json()["detail"])
    # one message, whether the path exists or not: nothing about the server's files leaks
    assert details == {OUTSIDE_ROOTS}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"refused '{root / 'escape'}'" in logged and "refused '/etc/passwd'" in logged
    assert "--allow-load-from" in OUTSIDE_ROOTS
    assert {p: p.stat().st_atime_ns for p in (outside / "beta").iterdir()} == read_before
    # bad names: 422 naming the rule, before the path is looked at
    for name in ("a/b", "..", "../alpha", "a\\b", "a\x00b", "new\nline", "", "sp ace", "x.y"):
        r = client.post("/v1/adapters", json={"name": name, "path": str(root / "alpha")})
        assert r.status_code == 422 and "is not usable" in r.json()["detail"], (name, r.text)
    # nothing was loaded or registered, and the server keeps serving
    assert client.get("/health").json()["loaded"] == []
    assert "x" not in client.get("/v1/adapters").json()["available"]
    r = client.post("/v1/generate", json={"prompt": PROMPTS[0], "adapter": "alpha"})
    assert r.status_code == 200 and r.json()["text"] == reference("alpha", PROMPTS[0])[0]
    # inside the root, a symlink that stays inside loads, and answers as its target does
    r = client.post("/v1/adapters", json={"name": "x", "path": str(root / "inner")})
    assert r.status_code == 200 and r.json()["path"] == str(root / "gamma")
    r = client.post("/v1/generate", json={"prompt": PROMPTS[1], "adapter": "x"})
    assert r.status_code == 200 and r.json()["text"] == reference("gamma", PROMPTS[1])[0]


def test_allow_load_from_adds_a_root(tok, lm_adapters, reference, clients, tmp_path):
    root, outside = escape_fixture(lm_adapters, tmp_path)
    client = lm_client(clients, tok, root, allow_load_from=[outside])
    for name, path in (("b1", outside / "beta"), ("b2", root / "escape"), ("b3", root / "run")):
        r = client.post("/v1/adapters", json={"name": name, "path": str(path)})
        assert r.status_code == 200, r.text
        r = client.post("/v1/generate", json={"prompt": PROMPTS[2], "adapter": name})
        assert r.status_code == 200 and r.json()["text"] == reference("beta", PROMPTS[2])[0]
    r = client.post("/v1/adapters", json={"name": "x", "path": str(tmp_path)})   # above both roots
    assert r.status_code == 403 and r.json()["detail"] == OUTSIDE_ROOTS
    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        create_app(lm_engine(tok, root), allow_load_from=[tmp_path / "missing"])


def test_a_base_only_app_without_roots_loads_nothing(tok, lm_adapters, reference, clients):
    client = clients.enter_context(__import__("fastapi.testclient").testclient.TestClient(
        create_app(lm_engine(tok, None))))
    r = client.post("/v1/adapters", json={"name": "x", "path": str(lm_adapters / "alpha")})
    assert r.status_code == 403 and r.json()["detail"] == NO_ROOTS
    assert "--adapters DIR" in NO_ROOTS and "--allow-load-from DIR" in NO_ROOTS
    r = client.post("/v1/generate", json={"prompt": PROMPTS[0]})
    assert r.status_code == 200 and r.json()["text"] == reference(None, PROMPTS[0])[0]


# ---- `peftlab serve` with no --adapters (acceptance 5) --------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_base_only_server_then_a_posted_adapter(tok, lm_adapters, reference, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_lm(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PEFTLAB_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "peftlab", "serve", "--model", str(model_dir), "--port", str(port),
               "--allow-load-from", str(lm_adapters), "--max-new-tokens-limit", str(LIMIT)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, server.stdout.read()
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
            assert client.get("/health").json()["loaded"] == []
            assert client.get("/v1/adapters").status_code == 401       # the key from the environment
            assert client.get("/v1/adapters", headers=auth).json()["available"] == {}
            r = client.post("/v1/generate", headers=auth, json={"prompt": PROMPTS[0], "max_tokens": LIMIT})
            assert r.status_code == 200 and r.json()["text"] == reference(None, PROMPTS[0])[0]
            r = client.post("/v1/adapters", headers=auth, json={"name": "a0", "path": str(lm_adapters / "alpha")})
            assert r.status_code == 200 and r.json()["loaded"] == ["a0"], r.text
            assert set(client.get("/v1/adapters", headers=auth).json()["available"]) == {"a0"}
            for prompt in PROMPTS:
                r = client.post("/v1/generate", headers=auth,
                                json={"prompt": prompt, "adapter": "a0", "max_tokens": LIMIT})
                assert r.status_code == 200 and r.json()["text"] == reference("alpha", prompt)[0], r.text
            assert reference("alpha", PROMPTS[0]) != reference(None, PROMPTS[0])   # the adapter acts
            r = client.post("/v1/adapters", headers=auth, json={"name": "b", "path": str(tmp_path)})
            assert r.status_code == 403
    finally:
        server.terminate()
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
    assert "(base only)" in out and "API key required" in out, out
