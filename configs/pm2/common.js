// Shared by the niche pm2 ecosystem files: where niche lives and how an app is run.
const path = require("path");

const env = (name, fallback) => process.env[name] || fallback;
const root = path.resolve(__dirname, "..", "..");
const niche = env("NICHE_BIN", path.join(root, ".venv", "bin", "niche"));

// One long-running niche process: restarted on crash (not in a tight loop), logs under logDir.
function nicheApp({ name, args, logDir = path.join(root, "logs"), autorestart = true, killTimeout = 30000 }) {
  return {
    name,
    script: niche,
    args,
    interpreter: "none",
    cwd: root,
    autorestart,
    max_restarts: 50,
    min_uptime: "60s",
    restart_delay: 10000,
    kill_timeout: killTimeout,
    out_file: path.join(logDir, `${name}.out.log`),
    error_file: path.join(logDir, `${name}.err.log`),
    time: true,
    env: { PYTHONUNBUFFERED: "1" },
  };
}

module.exports = { env, root, niche, nicheApp };
