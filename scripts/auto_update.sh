#!/usr/bin/env bash
# Opt-in auto-update for pm2-run neurons: if a newer release tag exists, check it out,
# reinstall with scripts/setup.sh and `pm2 restart` the named processes.
#
#   scripts/auto_update.sh [--dry-run] [--remote NAME] [--pattern GLOB] [--repo DIR]
#                          [--setup CMD] [--pm2 PATH] PROCESS...
#
#   --dry-run      say what would be done, change nothing (still fetches tags)
#   --remote NAME  git remote to fetch tags from (default origin)
#   --pattern GLOB release tags (default 'v[0-9]*'), compared as versions (sort -V)
#   --repo DIR     the niche checkout (default: the one this script is in)
#   --setup CMD    reinstall command, run in the checkout (default: bash scripts/setup.sh)
#   --pm2 PATH     pm2 executable (default: ./node_modules/.bin/pm2, else pm2 on PATH)
#
# Exit status: 0 up to date or updated, 1 update failed (the previous checkout is restored
# when the reinstall fails), 2 usage error. A checkout with local changes is never touched.
# Run it from pm2 every 30 minutes with configs/pm2/auto_update.config.js; read
# CHANGELOG.md before enabling it: validators upgrade before miners across protocol bumps.
set -euo pipefail

dry_run=0 remote=origin pattern='v[0-9]*' repo="" setup="" pm2="" processes=()
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --remote) remote="${2:?--remote needs a name}"; shift ;;
        --pattern) pattern="${2:?--pattern needs a glob}"; shift ;;
        --repo) repo="${2:?--repo needs a folder}"; shift ;;
        --setup) setup="${2:?--setup needs a command}"; shift ;;
        --pm2) pm2="${2:?--pm2 needs a path}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "auto_update: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) processes+=("$1") ;;
    esac
    shift
done
if [ ${#processes[@]} -eq 0 ]; then
    echo "auto_update: name the pm2 processes to restart, e.g. niche-miner (see --help)" >&2
    exit 2
fi
repo="${repo:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$repo"
setup="${setup:-bash scripts/setup.sh}"
if [ -z "$pm2" ]; then
    if [ -x node_modules/.bin/pm2 ]; then pm2="$PWD/node_modules/.bin/pm2"; else pm2=pm2; fi
fi
log() { echo "[auto_update $(date -u +%FT%TZ)] $*"; }

git fetch --quiet --tags "$remote"
latest="$(git tag --list "$pattern" --sort=-v:refname | head -n 1)"
if [ -z "$latest" ]; then
    log "no release tag matching '$pattern' on $remote: nothing to do"
    exit 0
fi
current="$(git describe --tags --abbrev=0 --match "$pattern" HEAD 2>/dev/null || true)"
if [ -n "$current" ] && [ "$(git rev-parse "$current^{commit}")" = "$(git rev-parse "$latest^{commit}")" ] \
   || [ "$current" = "$latest" ]; then
    log "up to date at $latest"
    exit 0
fi
if [ -n "$current" ] && [ "$(printf '%s\n%s\n' "$current" "$latest" | sort -V | tail -n 1)" = "$current" ]; then
    log "up to date: $current is not older than $latest"
    exit 0
fi
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    log "newer release $latest, but $repo has local changes: not updating (commit or stash them)"
    exit 1
fi
if [ "$dry_run" = 1 ]; then
    log "dry run: would check out $latest (now ${current:-untagged}), run '$setup', then $pm2 restart ${processes[*]}"
    exit 0
fi
previous="$(git rev-parse HEAD)"
log "updating ${current:-untagged} -> $latest"
git -c advice.detachedHead=false checkout --quiet "tags/$latest"
if ! sh -c "$setup"; then
    log "reinstall failed: back to $previous, processes not restarted"
    git -c advice.detachedHead=false checkout --quiet "$previous"
    exit 1
fi
for name in "${processes[@]}"; do
    log "$pm2 restart $name"
    "$pm2" restart "$name" --update-env
done
log "updated to $latest"
