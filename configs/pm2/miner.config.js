// pm2 ecosystem for a niche miner on a real network.
//   NETUID=23 WALLET_NAME=miner WALLET_HOTKEY=default MODEL=flux-schnell AXON_PORT=8091 \
//     pm2 start configs/pm2/miner.config.js
// Every setting has an environment variable; `niche miner --help` documents the flags.
const env = (name, fallback) => process.env[name] || fallback;
const path = require("path");
const root = path.resolve(__dirname, "..", "..");
const niche = env("NICHE_BIN", path.join(root, ".venv", "bin", "niche"));
const name = `niche-miner-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`;

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
  apps: [
    {
      name,
      script: niche,
      args,
      interpreter: "none",
      cwd: root,
      autorestart: true,
      max_restarts: 50,
      min_uptime: "60s",
      restart_delay: 10000,
      kill_timeout: 30000,
      out_file: path.join(root, "logs", `${name}.out.log`),
      error_file: path.join(root, "logs", `${name}.err.log`),
      time: true,
      env: { PYTHONUNBUFFERED: "1" },
    },
  ],
};
