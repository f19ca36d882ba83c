#!/usr/bin/env bash
# Rehearse configs/pm2/miner.config.js on a local chain before spending TAO: creates a local
# chain file and a wallet, registers the hotkey, starts the miner under pm2 with the SAME
# config file (localnet chain, tiny checkpoints, CPU), waits for /healthz, shows the miner's
# own metagraph row and metrics, then deletes the pm2 app. Nothing touches a real network.
# Everything it writes (chain, wallets, the app's pm2 logs) is under REHEARSAL_DIR
# (default ~/.niche/rehearsal); pm2's own files are under PM2_HOME as usual.
#   bash scripts/rehearse-miner-pm2.sh            # KEEP=1 leaves the app running
# Run it after `bash scripts/setup.sh` (it uses .venv/bin/niche and node_modules/.bin/pm2).
set -euo pipefail
cd "$(dirname "$0")/.."
NICHE="${NICHE_BIN:-$PWD/.venv/bin/niche}"
PY="$(dirname "$NICHE")/python"
PM2="${PM2:-$PWD/node_modules/.bin/pm2}"
DIR="${REHEARSAL_DIR:-$HOME/.niche/rehearsal}"
NET=(--subtensor.network localnet --localnet.path "$DIR/chain.db" --netuid 1)
WALLET=(--wallet.name rehearsal --wallet.hotkey miner --wallet.path "$DIR/wallets")
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

mkdir -p "$DIR"
"$NICHE" chain create-subnet --localnet.path "$DIR/chain.db" --netuid 1 --exist-ok
"$NICHE" chain wallet-create "${WALLET[@]}"
"$NICHE" chain register "${NET[@]}" "${WALLET[@]}"
HOTKEY="$("$NICHE" chain wallet-create "${WALLET[@]}" | sed -E 's/.*hotkey ([^ ]+).*/\1/')"
AXON_PORT="$(free_port)"
METRICS_PORT="$(free_port)"
export NICHE_BIN="$NICHE" NETUID=1 SUBTENSOR_NETWORK=localnet LOCALNET_PATH="$DIR/chain.db" \
    WALLET_NAME=rehearsal WALLET_HOTKEY=miner WALLET_PATH="$DIR/wallets" \
    AXON_IP=127.0.0.1 AXON_PORT METRICS_PORT MODEL="flux-schnell kolors" DEVICE=cpu \
    EXTRA_ARGS="--tiny" NICHE_LOG_DIR="$DIR/logs"
APP=niche-miner-rehearsal-miner
"$PM2" delete "$APP" >/dev/null 2>&1 || true
"$PM2" start configs/pm2/miner.config.js
trap '[ "${KEEP:-0}" = 1 ] || "$PM2" delete "$APP" >/dev/null 2>&1 || true' EXIT
echo "[rehearsal] waiting for the miner on 127.0.0.1:$AXON_PORT (it loads the tiny models)"
"$PY" - "$AXON_PORT" "$METRICS_PORT" <<'PYEOF'
import sys, time, urllib.request
axon, metrics = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + float(__import__("os").environ.get("REHEARSAL_TIMEOUT", "600"))
while True:
    try:
        print(urllib.request.urlopen(f"http://127.0.0.1:{axon}/healthz", timeout=5).read().decode())
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("[rehearsal] the miner did not come up: see `pm2 logs`")
        time.sleep(1)
text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
print("\n".join(l for l in text.splitlines() if l.startswith(("niche_miner_registered", "niche_miner_uid"))))
PYEOF
"$NICHE" chain metagraph "${NET[@]}" --hotkey "$HOTKEY"
echo "[rehearsal] ok: configs/pm2/miner.config.js serves on localnet (app $APP, logs $DIR/logs)"
