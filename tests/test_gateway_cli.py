"""`niche gateway keys create|list|revoke` on a real SQLite file; keys stored hashed."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from niche.cli import main
from niche.gateway.db import GatewayDB
from niche.gateway.keys import KeyStore


def test_keys_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "gw.sqlite")
    assert main(["gateway", "keys", "create", "--name", "alice", "--per-minute", "5",
                 "--per-day", "50", "--json", "--gateway.db", db]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("nk-") and created["name"] == "alice"
    stored = sqlite3.connect(db).execute("SELECT hash FROM keys").fetchall()
    assert created["key"] not in str(stored) and len(stored[0][0]) == 64  # only the sha256
    assert main(["gateway", "keys", "list", "--gateway.db", db]) == 0
    listing = capsys.readouterr().out
    assert created["id"] in listing and "alice" in listing and "active" in listing
    assert created["key"] not in listing
    assert main(["gateway", "keys", "revoke", created["id"], "--gateway.db", db]) == 0
    assert main(["gateway", "keys", "list", "--gateway.db", db]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["gateway", "keys", "revoke", created["id"], "--gateway.db", db]) == 2
    assert "no active key" in capsys.readouterr().err


def test_bad_key_options_and_serve_without_netuid_are_one_line_errors(tmp_path, capsys):
    db = str(tmp_path / "gw.sqlite")
    assert main(["gateway", "keys", "create", "--name", "x", "--per-day", "0",
                 "--gateway.db", db]) == 2
    assert "--per-day must be in 1..1000000000, not 0" in capsys.readouterr().err
    assert main(["gateway", "serve", "--gateway.db", db]) == 2
    assert "--netuid is required" in capsys.readouterr().err
    assert main(["gateway", "serve", "--netuid", "1", "--gateway.audit_fraction", "2",
                 "--gateway.db", db]) == 2
    assert "audit_fraction" in capsys.readouterr().err


def test_keys_create_says_which_database_the_key_is_in(tmp_path, capsys):
    db = tmp_path / "gw.sqlite"
    assert main(["gateway", "keys", "create", "--name", "bob", "--gateway.db", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"in {db}" in out and f"--gateway.db {db}" in out
    assert main(["gateway", "keys", "list", "--gateway.db", str(db)]) == 0
    assert f"keys in {db}" in capsys.readouterr().out


def test_localnet_names_the_gateway_database_and_the_command_for_it(tmp_path):
    from niche.commands.gateway import localnet_keys_line

    line = localnet_keys_line(["gateway", "serve", "--gateway.db", "/w/gateway/gateway.sqlite"])
    assert line == ("gateway keys: /w/gateway/gateway.sqlite; another key: niche gateway keys "
                    "create --name NAME --gateway.db /w/gateway/gateway.sqlite")


def test_serve_logs_each_request_to_its_logging_dir_and_keeps_metrics_off_the_api(
        tmp_path, tiny_root):
    """`niche gateway serve` as a process: --logging.logging_dir gets one line per request
    (4xx and 5xx included), /metrics is on --metrics.port only, and no CORS by default."""
    from gateway_support import make_chain

    from niche.devnet.localnet.supervisor import free_port

    net = make_chain(tmp_path, miners=0)
    net.chain.close()
    db, logs = tmp_path / "gw.sqlite", tmp_path / "logs"
    assert main(["gateway", "keys", "create", "--name", "t", "--json", "--gateway.db",
                 str(db)]) == 0
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("niche")), "gateway", "serve", "--netuid", "1",
         "--subtensor.network", "localnet", "--localnet.path", str(tmp_path / "chain.db"),
         "--wallet.name", "validator", "--wallet.hotkey", "hot", "--wallet.path",
         str(tmp_path / "wallets"), "--gateway.port", str(port), "--gateway.db", str(db),
         "--gateway.organic_queue", str(tmp_path / "q.sqlite"), "--models", "flux-schnell",
         "--model-path", str(tiny_root), "--metrics.port", str(metrics_port),
         "--logging.logging_dir", str(logs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        secret = KeyStore(GatewayDB(db)).create("second")[0]
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "flux-schnell", "prompt": "x"}
        assert httpx.post(url + "/v1/images/generations", json=body).status_code == 401
        none = httpx.post(url + "/v1/images/generations", json=body, headers=auth)
        assert none.status_code == 503  # no miner on this subnet
        assert httpx.get(url + "/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'niche_gateway_requests_total{model="flux-schnell",status="503"} 1.0' in scraped
        models = httpx.get(url + "/v1/models", headers={"Origin": "http://app.example"})
        assert "access-control-allow-origin" not in models.headers
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    text = (logs / "niche-gateway.log").read_text()
    assert f"keys and usage in {db}" in text, text
    second = KeyStore(GatewayDB(db)).list()[1].id
    assert "POST /v1/images/generations 401 key=- " in text, text
    assert f"POST /v1/images/generations 503 key={second} " in text, text
    assert "GET /v1/models 200 key=- " in text, text
