// pm2 ecosystem for a niche miner on a real network.
//   NETUID=23 WALLET_NAME=miner WALLET_HOTKEY=default MODEL=flux-schnell AXON_PORT=8091 \
//     pm2 start configs/pm2/miner.config.js
// Every setting has an environment variable; `niche miner --help` documents the flags.
const { env, nicheApp } = require("./common");

const args = [
  "miner",
  "--netuid", env("NETUID", "23"),
  "--wallet.name", env("WALLET_NAME", "default"),
  "--wallet.hotkey", env("WALLET_HOTKEY", "default"),
  "--subtensor.network", env("SUBTENSOR_NETWORK", "finney"),
  "--axon.port", env("AXON_PORT", "8091"),
  "--model", env("MODEL", "flux-schnell"),
  "--device", env("DEVICE", "cuda"),
  "--memory-mode", env("MEMORY_MODE", "gpu"),
  "--blacklist.min_stake", env("MIN_STAKE", "1000"),
];
if (process.env.AXON_EXTERNAL_IP) args.push("--axon.external_ip", process.env.AXON_EXTERNAL_IP);
if (process.env.MODEL_PATH) args.push("--model-path", process.env.MODEL_PATH);
if (process.env.WALLET_PATH) args.push("--wallet.path", process.env.WALLET_PATH);

module.exports = {
  apps: [nicheApp({
    name: `niche-miner-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`,
    args,
  })],
};
