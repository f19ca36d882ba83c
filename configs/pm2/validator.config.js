// pm2 ecosystem for a niche validator on a real network.
//   NETUID=<NETUID> WALLET_NAME=validator WALLET_HOTKEY=default SUBTENSOR_NETWORK=finney \
//     pm2 start configs/pm2/validator.config.js
// A variable that is not set passes no flag, so every default is `niche validator`'s own
// (`niche validator --help`); EXTRA_ARGS="--flag value ..." passes any other flag.
const { env, nicheApp, argsFromEnv, COMMON_FLAGS } = require("./common");

const name = `niche-validator-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`;
const args = argsFromEnv("validator", [
  ...COMMON_FLAGS,
  ["MODELS", "--models", "list"],
  ["MODEL", "--models", "list"], // the miner's name for it
  ["SAMPLE_SIZE", "--neuron.sample_size"],
  ["AUDIT_FRACTION", "--neuron.audit_fraction"],
  ["AUDIT_STEPS", "--neuron.audit_steps"],
  ["EPOCH_LENGTH", "--neuron.epoch_length"],
  ["ROUND_INTERVAL", "--neuron.round_interval"],
  ["STATE_PATH", "--neuron.state_path"],
  ["EMISSION_SHARE", "--neuron.emission_share", "list"],
  ["PROMPTS_FILE", "--neuron.prompts_file"],
  ["ORGANIC_QUEUE", "--neuron.organic_queue"], // the gateway's (gateway.config.js)
  ["DASHBOARD_PORT", "--dashboard.port"],
  ["DASHBOARD_HOST", "--dashboard.host"],
]);

// A validator saves its round on SIGTERM: give it time.
module.exports = { apps: [nicheApp({ name, args, killTimeout: 60000 })] };
