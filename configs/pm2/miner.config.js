// pm2 ecosystem for a niche miner on a real network.
//   NETUID=<NETUID> WALLET_NAME=miner WALLET_HOTKEY=default SUBTENSOR_NETWORK=finney \
//     AXON_PORT=8091 AXON_EXTERNAL_IP=203.0.113.7 MODEL="flux-schnell kolors" \
//     pm2 start configs/pm2/miner.config.js
// A variable that is not set passes no flag, so every default is `niche miner`'s own
// (`niche miner --help`); EXTRA_ARGS="--flag value ..." passes any other flag.
// Rehearse it on localnet first: docs/miner.md "Rehearse the pm2 set-up on localnet".
const { env, nicheApp, argsFromEnv, COMMON_FLAGS } = require("./common");

const args = argsFromEnv("miner", [
  ...COMMON_FLAGS,
  ["AXON_IP", "--axon.ip"],
  ["AXON_PORT", "--axon.port"],
  ["AXON_EXTERNAL_IP", "--axon.external_ip"],
  ["MODEL", "--model", "list"],
  ["MODELS", "--model", "list"], // the validator's and gateway's name for it
  ["MIN_STAKE", "--blacklist.min_stake"],
  ["ALLOW_HOTKEYS", "--blacklist.allow_hotkeys", "list"],
  ["REQUESTS_PER_MINUTE", "--limits.requests_per_minute"],
  ["QUEUE_MAX_SIZE", "--queue.max_size"],
  ["METAGRAPH_REFRESH", "--metagraph.refresh"],
]);

module.exports = {
  apps: [nicheApp({
    name: `niche-miner-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`,
    args,
  })],
};
