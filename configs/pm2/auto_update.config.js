// Opt-in auto-update (scripts/auto_update.sh): every 30 minutes pm2 runs the script, which
// checks out a newer release tag if there is one, reinstalls with scripts/setup.sh and
// restarts the named niche processes. Read CHANGELOG.md first (validators upgrade before
// miners across a protocol bump).
//   PROCESSES="niche-miner-miner-default" pm2 start configs/pm2/auto_update.config.js
//   DRY_RUN=1 ... only logs what it would do.
const path = require("path");
const { env, root, logDir, ensureDir } = require("./common");

const args = env("PROCESSES", "").split(/\s+/).filter(Boolean);
if (args.length === 0) throw new Error("set PROCESSES to the pm2 names to restart on update");
if (process.env.DRY_RUN) args.unshift("--dry-run");
if (process.env.GIT_REMOTE) args.unshift("--remote", process.env.GIT_REMOTE);

module.exports = {
  apps: [{
    name: "niche-auto-update",
    script: path.join(root, "scripts", "auto_update.sh"),
    args,
    interpreter: "bash",
    cwd: root,
    autorestart: false, // a one-shot check; cron_restart runs it again
    cron_restart: env("SCHEDULE", "*/30 * * * *"),
    out_file: path.join(ensureDir(logDir), "niche-auto-update.out.log"),
    error_file: path.join(logDir, "niche-auto-update.err.log"),
    time: true,
  }],
};
