// pm2 ecosystem for the whole local subnet (chain file, miners, validators) on one machine.
//   pm2 start configs/pm2/localnet.config.js        # LOCALNET_MINERS=3 LOCALNET_DIR=... to change
//   pm2 logs / pm2 status / pm2 delete configs/pm2/localnet.config.js
// Loading this file runs `niche localnet --prepare-only --json`, which builds the tiny
// checkpoints if missing, creates a fresh chain file and wallets, registers them with stake and
// picks free ports; the apps below run exactly the commands of that plan.
const { execFileSync } = require("child_process");
const path = require("path");
const os = require("os");

const env = (name, fallback) => process.env[name] || fallback;
const root = path.resolve(__dirname, "..", "..");
const niche = env("NICHE_BIN", path.join(root, ".venv", "bin", "niche"));
const workdir = env("LOCALNET_DIR", path.join(os.homedir(), ".niche", "localnet-pm2"));

const prepareArgs = [
  "localnet", "--prepare-only", "--json",
  "--workdir", workdir,
  "--miners", env("LOCALNET_MINERS", "2"),
  "--models", ...env("LOCALNET_MODELS", "flux-schnell kolors").split(/\s+/),
];
if (process.env.LOCALNET_ROUNDS) prepareArgs.push("--rounds", process.env.LOCALNET_ROUNDS);
const plan = JSON.parse(execFileSync(niche, prepareArgs, { encoding: "utf8" }));

module.exports = {
  apps: plan.processes.map((proc) => ({
    name: `localnet-${proc.name}`,
    script: niche,
    args: proc.args,
    interpreter: "none",
    cwd: root,
    // A validator with a round budget finishes by itself; everything else stays up.
    autorestart: !(proc.role === "validator" && plan.rounds),
    max_restarts: 5,
    restart_delay: 3000,
    kill_timeout: 20000,
    out_file: path.join(workdir, "logs", `pm2-${proc.name}.out.log`),
    error_file: path.join(workdir, "logs", `pm2-${proc.name}.err.log`),
    time: true,
    env: { PYTHONUNBUFFERED: "1" },
  })),
};
