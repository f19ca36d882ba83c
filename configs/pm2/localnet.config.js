// pm2 ecosystem for the whole local subnet (chain file, miners, validators) on one machine.
//   pm2 start configs/pm2/localnet.config.js        # LOCALNET_MINERS=3 LOCALNET_DIR=... to change
//   pm2 logs / pm2 status / pm2 delete configs/pm2/localnet.config.js
// Loading this file runs `niche localnet --prepare-only --json`, which builds the tiny
// checkpoints if missing, creates a fresh chain file and wallets, registers them with stake and
// picks free ports; the apps below run exactly the commands of that plan.
const { execFileSync } = require("child_process");
const path = require("path");
const os = require("os");
const { env, niche, nicheApp } = require("./common");

const workdir = env("LOCALNET_DIR", path.join(os.homedir(), ".niche", "localnet-pm2"));
const prepareArgs = [
  "localnet", "--prepare-only", "--json",
  "--workdir", workdir,
  "--miners", env("LOCALNET_MINERS", "2"),
  "--models", ...env("LOCALNET_MODELS", "flux-schnell kolors").split(/\s+/),
];
if (process.env.LOCALNET_ROUNDS) prepareArgs.push("--rounds", process.env.LOCALNET_ROUNDS);
const plan = JSON.parse(execFileSync(niche, prepareArgs, { encoding: "utf8" }));
// What `niche localnet` prints, for whoever runs `pm2 start` (also in WORKDIR/plan.json).
if (plan.dashboard_url) console.error(`localnet dashboard (validator1): ${plan.dashboard_url}`);
if (plan.gateway_url) {
  console.error(`localnet gateway (OpenAI images API): ${plan.gateway_url}/v1  ` +
                `playground: ${plan.gateway_url}/  API key: ${plan.gateway_key}`);
}

module.exports = {
  apps: plan.processes.map((proc) => nicheApp({
    name: `localnet-${proc.name}`,
    args: proc.args,
    logDir: path.join(workdir, "logs"),
    // A validator with a round budget finishes by itself; everything else stays up.
    autorestart: !(proc.role === "validator" && plan.rounds),
    killTimeout: 20000,
  })),
};
