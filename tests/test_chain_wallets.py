"""Wallet loading errors an operator can act on, with real bittensor keyfiles."""
from __future__ import annotations

import pytest

from niche.chain import ChainError
from niche.chain.wallets import create_wallet, load_wallet


def test_create_is_offline_idempotent_and_unencrypted(tmp_path):
    w = create_wallet("alice", "hot1", tmp_path)
    again = create_wallet("alice", "hot1", tmp_path)
    assert again.hotkey.ss58_address == w.hotkey.ss58_address
    assert again.coldkeypub.ss58_address == w.coldkeypub.ss58_address
    assert not w.hotkey_file.is_encrypted() and not w.coldkey_file.is_encrypted()
    second = create_wallet("alice", "hot2", tmp_path)  # new hotkey under the same coldkey
    assert second.coldkeypub.ss58_address == w.coldkeypub.ss58_address
    assert second.hotkey.ss58_address != w.hotkey.ss58_address
    loaded = load_wallet("alice", "hot2", tmp_path, need_coldkey=True, interactive=False)
    assert loaded.coldkey.ss58_address == w.coldkeypub.ss58_address


def test_missing_wallet_and_hotkey(tmp_path):
    with pytest.raises(ChainError, match="coldkeypub.txt of wallet 'nobody'.*wallet-create"):
        load_wallet("nobody", "hot", tmp_path, interactive=False)
    create_wallet("bob", "hot", tmp_path)
    with pytest.raises(ChainError, match="hotkey of wallet 'bob' \\(hotkey 'other'.*missing"):
        load_wallet("bob", "other", tmp_path, interactive=False)


def test_encrypted_hotkey_refused_when_non_interactive(tmp_path, monkeypatch):
    import bittensor as bt

    w = bt.Wallet("carol", "locked", str(tmp_path))
    w.create_new_coldkey(use_password=False, suppress=True)
    w.create_new_hotkey(suppress=True, hotkey_password="s3cret-pass")
    assert w.hotkey_file.is_encrypted()
    monkeypatch.delenv(w.hotkey_file.env_var_name(), raising=False)
    with pytest.raises(ChainError, match="password-protected.*non-interactive.*unencrypted") as e:
        load_wallet("carol", "locked", tmp_path, interactive=False)
    assert "\n" not in str(e.value)
    # bittensor's own escape hatch still works: the password stored in the keyfile's env var
    w.hotkey_file.save_password_to_env("s3cret-pass")
    loaded = load_wallet("carol", "locked", tmp_path, interactive=False)
    assert loaded.hotkey.ss58_address == w.hotkey.ss58_address
