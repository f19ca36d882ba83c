// pm2 ecosystem for a niche miner whose engine runs as Ray Serve replicas (one per GPU).
//   NETUID=<NETUID> WALLET_NAME=miner WALLET_HOTKEY=default AXON_EXTERNAL_IP=203.0.113.7 \
//     REPLICAS=4 pm2 start configs/pm2/miner-ray.config.js
// Two machines: `ray start --head` here, `ray start --address HEAD:6379` there, and
// RAY_ADDRESS=auto. The other variables are miner.config.js's (docs/miner.md).
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
  "--engine.backend", "ray",
  "--engine.replicas", env("REPLICAS", "4"),
  "--engine.gpus_per_replica", env("GPUS_PER_REPLICA", "1"),
];
if (process.env.RAY_ADDRESS) args.push("--ray.address", process.env.RAY_ADDRESS);
if (process.env.AXON_EXTERNAL_IP) args.push("--axon.external_ip", process.env.AXON_EXTERNAL_IP);
if (process.env.MODEL_PATH) args.push("--model-path", process.env.MODEL_PATH);
if (process.env.WALLET_PATH) args.push("--wallet.path", process.env.WALLET_PATH);

module.exports = {
  apps: [nicheApp({
    name: `niche-miner-ray-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`,
    args,
    killTimeout: 30000, // the miner stops its replicas on SIGTERM before it exits
  })],
};
