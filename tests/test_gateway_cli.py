"""`niche gateway keys create|list|revoke` on a real SQLite file; keys stored hashed."""
from __future__ import annotations

import json
import sqlite3

from niche.cli import main


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
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["gateway", "serve", "--gateway.db", db]) == 2
    assert "--netuid is required" in capsys.readouterr().err
    assert main(["gateway", "serve", "--netuid", "1", "--gateway.audit_fraction", "2",
                 "--gateway.db", db]) == 2
    assert "audit_fraction" in capsys.readouterr().err
