// pm2 ecosystem for the OpenAI-compatible gateway beside a validator (docs/gateway.md).
//   NETUID=<NETUID> WALLET_NAME=validator WALLET_HOTKEY=default SUBTENSOR_NETWORK=finney \
//     GATEWAY_IP=0.0.0.0 GATEWAY_PORT=8000 ORGANIC_QUEUE=~/.niche/gateway/organic.sqlite \
//     METRICS_PORT=9102 pm2 start configs/pm2/gateway.config.js
// Sign with the validator's wallet and hotkey, and give the validator (validator.config.js)
// the same ORGANIC_QUEUE; VALIDATOR_STATE is the validator's STATE_PATH when it was given one.
// A variable that is not set passes no flag, so every default is `niche gateway serve`'s own
// (`niche gateway serve --help`); EXTRA_ARGS="--flag value ..." passes any other flag.
const { env, nicheApp, argsFromEnv, CHAIN_FLAGS } = require("./common");

const args = argsFromEnv(["gateway", "serve"], [
  ...CHAIN_FLAGS,
  ["GATEWAY_IP", "--gateway.ip"],
  ["GATEWAY_PORT", "--gateway.port"],
  ["GATEWAY_DB", "--gateway.db"],
  ["ORGANIC_QUEUE", "--gateway.organic_queue"],
  ["VALIDATOR_STATE", "--gateway.validator_state"],
  ["GATEWAY_AUDIT_FRACTION", "--gateway.audit_fraction"],
  ["GATEWAY_PUBLIC_URL", "--gateway.public_url"],
  ["CORS_ORIGINS", "--gateway.cors_origins", "list"],
  ["MODELS", "--models", "list"],
  ["MODEL", "--models", "list"], // the miner's name for it
  ["MODEL_PATH", "--model-path"],
  ["METRICS_PORT", "--metrics.port"],
  ["METRICS_HOST", "--metrics.host"],
  ["LOGGING_DEBUG", "--logging.debug", "switch"],
]);

module.exports = {
  apps: [nicheApp({
    name: `niche-gateway-${env("WALLET_NAME", "default")}-${env("WALLET_HOTKEY", "default")}`,
    args,
  })],
};
