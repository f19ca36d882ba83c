"""`niche localnet`: the whole subnet on this machine, then a scoreboard."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

DEFAULT_WORKDIR = "~/.niche/localnet"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "localnet", help="run a local chain, miners and validators on this machine",
        description="Build tiny checkpoints if missing, create a local chain file and "
        "wallets, register everything with stake, start miners and validators as separate "
        "processes on 127.0.0.1, then print a scoreboard. Ctrl-C stops every child.")
    parser.add_argument("--miners", type=int, default=3, help="number of miners (default 3)")
    parser.add_argument("--validators", type=int, default=1, help="number of validators (1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="validator rounds (at least 1), then stop by itself and exit 0 "
                             "(default: run until Ctrl-C)")
    parser.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"],
                        help="models, assigned to miners in turn (default flux-schnell kolors)")
    from niche.devnet.localnet.cheat_names import CHEATS

    parser.add_argument("--cheat", action="append", default=[], metavar="BEHAVIOUR",
                        choices=list(CHEATS),
                        help="make one more of the miners dishonest (repeatable) to watch "
                             "the validator catch it: " + "; ".join(
                                 f"{name}: {what}" for name, what in CHEATS.items()))
    parser.add_argument("--audit-fraction", type=float, default=1.0,
                        help="share of answers the validator audits, 0..1 (default 1.0)")
    parser.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR).expanduser(),
                        help=f"chain file, wallets, state and logs (default {DEFAULT_WORKDIR}); "
                             "one localnet at a time per workdir (a second is refused)")
    parser.add_argument("--netuid", type=int, default=1, help="local subnet id (default 1)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="folder of checkpoints (default: the tiny ones, built if missing)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the chain and state in --workdir instead of starting fresh")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only prepare (chain, wallets, ports) and print the plan; "
                             "used by configs/pm2/localnet.config.js")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false",
                        help="do not start the OpenAI-compatible gateway (docs/gateway.md)")
    parser.add_argument("--miner1-args", dest="miner1_args", default="", metavar="FLAGS",
                        help="extra `niche miner` flags for miner1, one string, e.g. "
                             "\"--engine.backend ray --engine.replicas 2\"; a single flag needs "
                             "the = form, else it is read as a flag of localnet: "
                             "--miner1-args=--engine.fast")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from niche.devnet.localnet.lock import workdir_lock
    from niche.devnet.localnet.plan import check_arguments
    from niche.errors import ConfigError

    # the arguments first: a refused run creates nothing (not even the workdir's lock)
    check_arguments(miners=args.miners, validators=args.validators, models=args.models,
                    cheats=args.cheat, rounds=args.rounds, audit_fraction=args.audit_fraction)
    try:
        shlex.split(args.miner1_args)
    except ValueError as exc:
        raise ConfigError(f"--miner1-args: {exc} in {args.miner1_args!r}") from None
    with workdir_lock(args.workdir):  # a second localnet on this workdir is refused
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from niche.devnet.localnet.plan import prepare

    plan = prepare(args.workdir, miners=args.miners, validators=args.validators,
                   models=args.models, cheats=args.cheat, rounds=args.rounds,
                   netuid=args.netuid, model_root=args.model_path, fresh=not args.keep,
                   audit_fraction=args.audit_fraction, gateway=args.gateway,
                   miner1_args=shlex.split(args.miner1_args))
    if args.prepare_only:
        if args.json:
            print(plan.to_json())
            return 0
        print(f"prepared {plan.workdir} (run its processes with pm2: "
              "configs/pm2/localnet.config.js)")
        for line in plan_addresses(plan):
            print(line)
        return 0
    from niche.devnet.localnet.run import run as run_plan
    from niche.devnet.localnet.scoreboard import collect, render

    print(f"localnet: chain {plan.chain_path}, netuid {plan.netuid}, models {plan.model_root} "
          f"(workdir {plan.workdir}, locked while this runs)", flush=True)
    code = run_plan(plan, say=lambda line: print(line, flush=True))
    rows, facts = collect(plan)
    print(f"\nscoreboard after {facts['rounds']} round(s):")
    print(render(rows, facts))
    return code


def plan_addresses(plan) -> list[str]:
    """What a user opens once the plan's processes run: the dashboard, the gateway and its
    key (under pm2 nothing else prints them)."""
    lines = []
    if plan.dashboard_url:
        lines.append(f"dashboard (validator1): {plan.dashboard_url}")
    if plan.gateway_url:
        lines.append(f"gateway (OpenAI images API): {plan.gateway_url}/v1  playground: "
                     f"{plan.gateway_url}/  API key: {plan.gateway_key}")
    return lines
