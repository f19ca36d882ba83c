// pm2 ecosystem for the whole local subnet (chain file, miners, validators) on one machine.
//   pm2 start configs/pm2/localnet.config.js        # LOCALNET_MINERS=3 LOCALNET_DIR=... to change
//   pm2 logs / pm2 status / pm2 restart|stop|delete configs/pm2/localnet.config.js
//   LOCALNET_FRESH=1 pm2 start configs/pm2/localnet.config.js   # a new chain (after delete)
// The first load on a workdir runs `niche localnet --prepare-only --json`, which builds the
// tiny checkpoints if missing, creates a fresh chain file and wallets, registers them with
// stake, picks free ports and writes WORKDIR/plan.json; the apps below run exactly the
// commands of that plan. Every later load (restart, stop, reload, delete, a start after a
// reboot) reads WORKDIR/plan.json instead: the same chain, state, logs, ports and gateway key.
// LOCALNET_FRESH=1 prepares again, wiping the chain, state and logs of that workdir; it is
// refused while a process of the plan still listens on its port (`pm2 delete` it first).
const { execFileSync } = require("child_process");
const fs = require("fs");
const path = require("path");
const os = require("os");
const { env, niche, nicheApp, words } = require("./common");

const workdir = path.resolve(env("LOCALNET_DIR", path.join(os.homedir(), ".niche", "localnet-pm2")));
const planFile = path.join(workdir, "plan.json");
const fresh = /^(1|true|yes)$/i.test(env("LOCALNET_FRESH", ""));
const models = words(env("LOCALNET_MODELS", "flux-schnell kolors"));

function readPlan() {
  try {
    return JSON.parse(fs.readFileSync(planFile, "utf8"));
  } catch (err) {
    throw new Error(`${planFile}: ${err.message}; LOCALNET_FRESH=1 prepares a new localnet ` +
                    "there (a new chain: its state and logs are wiped)");
  }
}

// The plan's ports that something on 127.0.0.1 accepts connections on (a child node process:
// a config file is loaded synchronously).
function portsInUse(plan) {
  const ports = plan.processes.map((p) => p.port).filter(Boolean);
  if (plan.dashboard_url) ports.push(Number(new URL(plan.dashboard_url).port));
  const script = `
    const net = require("net");
    const ports = ${JSON.stringify(ports)}, hits = [];
    let left = ports.length;
    if (left === 0) console.log("[]");
    for (const port of ports) {
      const s = net.connect(port, "127.0.0.1");
      let seen = false;
      const done = (open) => {
        if (seen) return;
        seen = true; s.destroy();
        if (open) hits.push(port);
        if (--left === 0) console.log(JSON.stringify(hits));
      };
      s.setTimeout(2000);
      s.once("connect", () => done(true));
      s.once("error", () => done(false));
      s.once("timeout", () => done(false));
    }`;
  return JSON.parse(execFileSync(process.execPath, ["-e", script], { encoding: "utf8" }));
}

// A LOCALNET_* variable set now that the reused plan does not follow: say so (not an error,
// so that `pm2 delete` still works with whatever is in the environment).
function warnIfDifferent(plan) {
  const differs = [];
  const miners = plan.processes.filter((p) => p.role === "miner").length;
  if (process.env.LOCALNET_MINERS && Number(process.env.LOCALNET_MINERS) !== miners) {
    differs.push(`LOCALNET_MINERS=${process.env.LOCALNET_MINERS} (plan: ${miners})`);
  }
  if (process.env.LOCALNET_ROUNDS && Number(process.env.LOCALNET_ROUNDS) !== plan.rounds) {
    differs.push(`LOCALNET_ROUNDS=${process.env.LOCALNET_ROUNDS} (plan: ${plan.rounds})`);
  }
  const validator = plan.processes.find((p) => p.role === "validator");
  if (process.env.LOCALNET_MODELS && validator) {
    const at = validator.args.indexOf("--models");
    const planned = [];
    for (let i = at + 1; at >= 0 && i < validator.args.length && !validator.args[i].startsWith("--"); i++) {
      planned.push(validator.args[i]);
    }
    if (planned.join(" ") !== models.join(" ")) {
      differs.push(`LOCALNET_MODELS="${models.join(" ")}" (plan: "${planned.join(" ")}")`);
    }
  }
  if (differs.length) {
    console.error(`localnet: ${differs.join(", ")} not applied: ${planFile} is reused; ` +
                  "pm2 delete this config, then LOCALNET_FRESH=1 pm2 start it for a new localnet");
  }
}

function prepare() {
  const args = [
    "localnet", "--prepare-only", "--json",
    "--workdir", workdir,
    "--miners", env("LOCALNET_MINERS", "2"),
    "--models", ...models,
  ];
  if (process.env.LOCALNET_ROUNDS) args.push("--rounds", process.env.LOCALNET_ROUNDS);
  return JSON.parse(execFileSync(niche, args, { encoding: "utf8" }));
}

let plan;
if (fs.existsSync(planFile) && !fresh) {
  plan = readPlan();
  console.error(`localnet: reusing ${planFile} (its chain, state and logs; LOCALNET_FRESH=1 ` +
                "for a new one)");
  warnIfDifferent(plan);
} else {
  if (fs.existsSync(planFile)) {
    const busy = portsInUse(readPlan());
    if (busy.length) {
      throw new Error(`LOCALNET_FRESH=1 refused: ${workdir} looks running (ports ` +
                      `${busy.join(", ")} of its plan answer); \`pm2 delete ` +
                      "configs/pm2/localnet.config.js` first (or pass another LOCALNET_DIR)");
    }
  }
  plan = prepare();
}
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
