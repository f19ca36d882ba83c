// Shared by the niche pm2 ecosystem files: where niche lives and how an app is run.
//   NICHE_BIN      the niche executable (default <checkout>/.venv/bin/niche)
//   NICHE_LOG_DIR  folder of the apps' pm2 logs, NAME.out.log / NAME.err.log (default
//                  <checkout>/logs; the localnet config uses LOCALNET_DIR/logs)
const fs = require("fs");
const path = require("path");

const env = (name, fallback) => process.env[name] || fallback;
const root = path.resolve(__dirname, "..", "..");
const niche = env("NICHE_BIN", path.join(root, ".venv", "bin", "niche"));
const logDir = path.resolve(env("NICHE_LOG_DIR", path.join(root, "logs")));

// pm2 does not create a missing log folder on restart (the app ends `stopped`, ENOENT).
function ensureDir(dir) {
  fs.mkdirSync(dir, { recursive: true });
  return dir;
}

// Exit codes pm2 must not restart: 2 = configuration error (bad flag, unknown model, out of
// GPU memory at load: restarting cannot fix it), 3 = the hotkey was deregistered.
const STOP_EXIT_CODES = [2, 3];

// Split a list variable on whitespace: MODEL="flux-schnell kolors" is two arguments.
const words = (value) => (value || "").split(/\s+/).filter((w) => w.length > 0);

// Command-line arguments from environment variables: each [VAR, "--flag", kind] adds the
// flag only when VAR is set (so every default is the CLI's own, `niche ... --help`).
// kind "list": VAR is split into separate arguments; "switch": a flag without value, added
// when VAR is 1/true/yes. EXTRA_ARGS (split on whitespace) passes any other flag.
// `command` is one word ("miner") or several (["gateway", "serve"]).
function argsFromEnv(command, table) {
  const args = [].concat(command);
  for (const [name, flag, kind] of table) {
    const value = process.env[name];
    if (value === undefined || value === "") continue;
    if (kind === "switch") {
      if (/^(1|true|yes)$/i.test(value)) args.push(flag);
    } else if (kind === "list") {
      args.push(flag, ...words(value));
    } else {
      args.push(flag, value);
    }
  }
  args.push(...words(process.env.EXTRA_ARGS));
  return args;
}

// The subnet, the chain and the wallet: every neuron and the gateway take them.
const CHAIN_FLAGS = [
  ["NETUID", "--netuid"],
  ["SUBTENSOR_NETWORK", "--subtensor.network"],
  ["SUBTENSOR_CHAIN_ENDPOINT", "--subtensor.chain_endpoint"],
  ["LOCALNET_PATH", "--localnet.path"],
  ["WALLET_NAME", "--wallet.name"],
  ["WALLET_HOTKEY", "--wallet.hotkey"],
  ["WALLET_PATH", "--wallet.path"],
];

// Flags both neurons take.
const COMMON_FLAGS = [
  ...CHAIN_FLAGS,
  ["MODEL_PATH", "--model-path"],
  ["MODEL_DIR", "--model-dir", "list"],
  ["DEVICE", "--device"],
  ["DTYPE", "--dtype"],
  ["MEMORY_MODE", "--memory-mode"],
  ["NUM_THREADS", "--num-threads"],
  ["METRICS_PORT", "--metrics.port"],
  ["METRICS_HOST", "--metrics.host"],
  ["LOGGING_DEBUG", "--logging.debug", "switch"],
];

// One long-running niche process: restarted on crash (not in a tight loop, not after a
// configuration error or a deregistration), logs under logDir (NICHE_LOG_DIR).
function nicheApp({ name, args, logDir: dir = logDir, autorestart = true, killTimeout = 30000 }) {
  ensureDir(dir);
  return {
    name,
    script: niche,
    args,
    interpreter: "none",
    cwd: root,
    autorestart,
    stop_exit_codes: STOP_EXIT_CODES,
    max_restarts: 50,
    min_uptime: "60s",
    restart_delay: 10000,
    kill_timeout: killTimeout,
    out_file: path.join(dir, `${name}.out.log`),
    error_file: path.join(dir, `${name}.err.log`),
    time: true, // pm2 stamps every line; NICHE_LOG_TIME=0: niche adds no second timestamp
    env: { PYTHONUNBUFFERED: "1", NICHE_LOG_TIME: "0" },
  };
}

module.exports = { env, root, niche, logDir, ensureDir, nicheApp, argsFromEnv, words, CHAIN_FLAGS, COMMON_FLAGS, STOP_EXIT_CODES };
