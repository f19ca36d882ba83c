// pm2 ecosystem for a niche validator on a real network.
//   NETUID=23 WALLET_NAME=validator WALLET_HOTKEY=default pm2 start configs/pm2/validator.config.js
// Every setting has an environment variable; `niche validator --help` documents the flags.
const path = require("path");
const { env, root, nicheApp } = require("./common");

const name = `niche-validator-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`;
const args = [
  "validator",
  "--netuid", env("NETUID", "23"),
  "--wallet.name", env("WALLET_NAME", "default"),
  "--wallet.hotkey", env("WALLET_HOTKEY", "default"),
  "--subtensor.network", env("SUBTENSOR_NETWORK", "finney"),
  "--models", ...env("MODELS", "flux-schnell kolors").split(/\s+/),
  "--device", env("DEVICE", "cuda"),
  "--neuron.sample_size", env("SAMPLE_SIZE", "32"),
  "--neuron.audit_fraction", env("AUDIT_FRACTION", "1.0"),
  "--neuron.state_path", env("STATE_PATH", path.join(root, "state", `${name}.sqlite`)),
];
if (process.env.MODEL_PATH) args.push("--model-path", process.env.MODEL_PATH);
if (process.env.WALLET_PATH) args.push("--wallet.path", process.env.WALLET_PATH);

// A validator saves its round on SIGTERM: give it time.
module.exports = { apps: [nicheApp({ name, args, killTimeout: 60000 })] };
