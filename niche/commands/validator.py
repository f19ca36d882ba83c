"""`niche validator`: run the validator loop (flags in bittensor's dotted convention)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

DEFAULT_STATE = "~/.niche/validator/NETWORK/netuidN/HOTKEY/state.sqlite"


def _pairs(values, flag: str, cast=float) -> dict:
    from niche.errors import ConfigError

    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: expected MODEL=VALUE, got {item!r}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ConfigError(f"{flag}: {value!r} is not a number") from None
    return out


def _thresholds(args: argparse.Namespace) -> dict[str, float]:
    """--verify.threshold, each checked: a similarity above 1 fails every honest miner (the
    audit excludes them for 50 rounds), one at or below 0 passes any image, and a key naming
    no model asked is a typo that would change nothing."""
    from niche.errors import ConfigError
    from niche.protocol import PipelineKind

    pipelines = [p.value for p in PipelineKind]
    thresholds = _pairs(args.verify_threshold, "--verify.threshold")
    for key, value in thresholds.items():
        model, _, pipeline = key.partition("/")
        if model not in args.models:
            raise ConfigError(f"--verify.threshold {key}: {model!r} is not one of --models "
                              f"({' '.join(args.models)})")
        if pipeline and pipeline not in pipelines:
            raise ConfigError(f"--verify.threshold {key}: unknown pipeline {pipeline!r} "
                              f"(one of {', '.join(pipelines)})")
        if not 0 < value <= 1:
            raise ConfigError(f"--verify.threshold {key}={value:g}: a similarity is in (0, 1] "
                              "(97 % is 0.97; the calibrated defaults are in docs/scoring.md)")
    return thresholds


def add_validator_args(parser: argparse.ArgumentParser) -> None:
    from niche.commands.chain_args import add_chain_args, add_wallet_args

    add_chain_args(parser)
    add_wallet_args(parser)
    n = parser.add_argument_group("neuron")
    n.add_argument("--neuron.sample_size", dest="sample_size", type=int, default=64,
                   help="most miners queried per round (default 64)")
    n.add_argument("--neuron.timeout", dest="timeout", type=float, default=None,
                   help="seconds a miner has to answer (default: the model's, e.g. 24 s "
                        "FLUX.1-schnell, 32 s Kolors)")
    n.add_argument("--neuron.epoch_length", dest="epoch_length", type=int, default=100,
                   help="blocks between weight settings (default 100; never below the "
                        "chain's rate limit)")
    n.add_argument("--neuron.audit_fraction", dest="audit_fraction", type=float, default=1.0,
                   help="fraction of valid answers audited by the step check (default 1: "
                        "it costs a few steps, not a regeneration)")
    n.add_argument("--neuron.audit_steps", dest="audit_steps", type=int, default=None,
                   help="steps recomputed per audit besides step 0 (default: enough that "
                        "faking 5%% of the steps is caught on >= 1/3 of audits: 1 of 4, "
                        "3 of 8, 6 of 30)")
    n.add_argument("--neuron.regenerate_fraction", dest="regenerate_fraction", type=float,
                   default=0.0, help="share of audited answers also regenerated in full "
                                     "(a backstop; default 0)")
    n.add_argument("--neuron.rounds", dest="rounds", type=int, default=None,
                   help="stop after this many rounds (default: run until stopped)")
    n.add_argument("--neuron.round_interval", dest="round_interval", type=float, default=12.0,
                   help="seconds between round starts (default 12)")
    n.add_argument("--neuron.state_path", dest="state_path", default=None,
                   help=f"SQLite state file (default {DEFAULT_STATE}); a file of another "
                        "network, netuid or hotkey is refused")
    n.add_argument("--neuron.seed", dest="seed", type=int, default=None,
                   help="challenge seed (default: a fresh secret one; set it only for tests)")
    n.add_argument("--neuron.exclusion_rounds", dest="exclusion_rounds", type=int, default=50,
                   help="rounds a hotkey that failed an audit is not queried (default 50)")
    n.add_argument("--neuron.alpha", dest="alpha", type=float, default=0.1,
                   help="EMA weight of the newest round (default 0.1)")
    n.add_argument("--neuron.emission_share", dest="emission_share", nargs="*",
                   metavar="MODEL=SHARE", help="per-model emission shares (default equal)")
    n.add_argument("--neuron.prompts_file", dest="prompts_file", type=Path, default=None,
                   help="one prompt per line instead of the built-in prompt grammar")
    n.add_argument("--neuron.organic_queue", dest="organic_queue", type=Path, default=None,
                   help="the gateway's queue of organic answers (its --gateway.organic_queue): "
                        "audit a share of them each round like challenges (default: none)")
    n.add_argument("--verify.dtypes", dest="verify_dtypes", nargs="*", default=[],
                   choices=("float32", "bfloat16", "float16"), metavar="DTYPE",
                   help="recompute miners' steps in these dtypes too, each with its own "
                        "copy of the models (default: only the engine's --dtype, the "
                        "subnet's; answers in any other dtype earn nothing: "
                        "docs/step-check.md)")
    n.add_argument("--verify.step_bands", dest="verify_step_bands", type=Path, default=None,
                   metavar="FILE",
                   help="step-check thresholds measured on this validator's weights and "
                        "hardware (`python bench/adversary.py --model-path DIR --write-bands "
                        "FILE`; default: the calibrated bands, docs/step-check.md)")
    n.add_argument("--verify.threshold", dest="verify_threshold", nargs="*",
                   metavar="MODEL[/PIPELINE]=T",
                   help="similarity in (0, 1] an audited image needs, per model or "
                        "model/pipeline, e.g. kolors=0.97 (default: calibrated per model and "
                        "pipeline; see docs/scoring.md)")
    m = parser.add_argument_group("models")
    m.add_argument("--models", "--model", dest="models", nargs="+",
                   default=["flux-schnell", "kolors"],
                   help="models this validator challenges (default: flux-schnell kolors)")
    from niche.commands.engine_args import add_engine_args

    add_engine_args(m)
    from niche.commands.metrics_args import add_metrics_args

    add_metrics_args(parser)
    from niche.commands.dashboard_args import add_dashboard_args

    add_dashboard_args(parser)
    from niche.commands.logging_args import add_logging_args

    add_logging_args(parser)
    r = parser.add_argument_group("registration")
    r.add_argument("--wait-for-permit", dest="wait_for_permit", action="store_true",
                   help="without a validator permit, wait for one (a log line per check) "
                        "instead of exiting with code 3")
    r.add_argument("--permit-poll", dest="permit_poll", type=float, default=60.0,
                   help="seconds between permit checks with --wait-for-permit (default 60)")
    r.add_argument("--keep-running-when-deregistered", dest="keep_running_deregistered",
                   action="store_true",
                   help="keep running rounds after the hotkey lost its uid (default: stop "
                        "with exit code 3, which pm2 does not restart)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validator", help="run a validator",
        description="Challenge miners with fresh requests, audit the answers with the step "
                    "check (recompute step 0 and random steps from the sampler states each "
                    "answer commits to, decode the last), score speed x correctness, set "
                    "weights. `niche validator status` and `niche validator dashboard` read "
                    "its state file.")
    add_validator_args(parser)
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="validator_command", metavar="ACTION")
    status = sub.add_parser("status", help="print a validator's state file: scores, "
                            "exclusions, last round, last weights (no chain, no models)")
    status.add_argument("--state", type=Path, default=None,
                        help=f"state file (the validator's --neuron.state_path; default: the "
                             f"one file matching {DEFAULT_STATE})")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    board = sub.add_parser("dashboard", help="serve the subnet dashboard of a validator's "
                           "state file (the validator's own --dashboard.port serves the same)")
    board.add_argument("--state", type=Path, default=None,
                       help=f"state file (default: the one file matching {DEFAULT_STATE})")
    from niche.validator.dashboard import DEFAULT_HOST

    board.add_argument("--port", type=int, default=8095, help="port (default 8095)")
    board.add_argument("--host", default=DEFAULT_HOST,
                       help=f"interface (default {DEFAULT_HOST}: this machine only)")
    board.set_defaults(func=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    import threading

    from niche.validator.dashboard import check_state, start_dashboard
    from niche.validator.state import find_state_file

    path = args.state.expanduser() if args.state else find_state_file()
    check_state(path)  # missing, not SQLite, another program's: one line, as status says
    dashboard = start_dashboard(path, args.port, args.host, port_flag="--port")
    print(f"dashboard of {path} on {dashboard.url} (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    finally:
        dashboard.close()
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from niche.validator.state import find_state_file
    from niche.validator.status import format_status, read_status

    data = read_status(args.state.expanduser() if args.state else find_state_file())
    print(json.dumps(data, indent=2) if args.json else format_status(data))
    return 0


def build_config(args: argparse.Namespace):
    from niche.errors import ConfigError

    if args.netuid is None:  # before the imports below (torch, diffusers: seconds)
        raise ConfigError("--netuid is required")
    from niche.validator.audit import AuditConfig
    from niche.validator.scoring import ScoringConfig
    from niche.validator.service import ValidatorConfig
    from niche.validator.steps import StepThresholds
    from niche.validator.verify import VerifyConfig

    shares = _pairs(args.emission_share, "--neuron.emission_share") or {
        m: 1.0 / len(args.models) for m in args.models}
    unknown = sorted(set(shares) - set(args.models))
    if unknown:
        raise ConfigError(f"--neuron.emission_share names models not in --models: {unknown}")
    try:
        audit = AuditConfig(random_steps=args.audit_steps,
                            regenerate_fraction=args.regenerate_fraction)
    except ValueError as exc:
        raise ConfigError(f"--neuron.audit_steps / --neuron.regenerate_fraction: {exc}") from None
    try:
        scoring = ScoringConfig(alpha=args.alpha, exclusion_rounds=args.exclusion_rounds,
                                model_shares=shares)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ValidatorConfig(
        netuid=args.netuid, models=tuple(args.models),
        state_path=Path(args.state_path).expanduser() if args.state_path else None,
        sample_size=args.sample_size,
        timeout=args.timeout, epoch_length=args.epoch_length,
        audit_fraction=args.audit_fraction, rounds=args.rounds,
        round_interval=args.round_interval, seed=args.seed, prompts_file=args.prompts_file,
        organic_queue=Path(args.organic_queue).expanduser() if args.organic_queue else None,
        scoring=scoring,
        audit=audit, wait_for_permit=args.wait_for_permit, permit_poll=args.permit_poll,
        keep_running_when_deregistered=args.keep_running_deregistered,
        verify=VerifyConfig.with_overrides(_thresholds(args)),
        step_thresholds=(StepThresholds.from_file(args.verify_step_bands)
                         if getattr(args, "verify_step_bands", None) else StepThresholds()))


def extra_dtypes(args: argparse.Namespace, engine, models) -> list[str]:
    """The --verify.dtypes the main engine does not already run every model in."""
    own = {engine.compute_dtype(m) for m in models}
    return [d for d in dict.fromkeys(getattr(args, "verify_dtypes", None) or [])
            if {d} != own]


def unheld_default_dtypes(engine, extra: list, models) -> list[str]:
    """One warning per model whose configured dtype (what its miners run by default) this
    validator does not recompute in: every such answer would be unverifiable (paid 0),
    e.g. Kolors (float16) under a validator started with --dtype bfloat16."""
    lines = []
    for model in models:
        default = engine.spec(model).dtype
        held = [engine.compute_dtype(model)] + [e.compute_dtype(model) for e in extra]
        if default not in held:
            lines.append(f"{model}: this validator recomputes it in {', '.join(held)}, but "
                         f"its miners run {default} by default: their answers are "
                         f"unverifiable (paid 0); drop --dtype, or add --verify.dtypes "
                         f"{default}")
    return lines


def run(args: argparse.Namespace) -> int:
    from niche.commands.startup import run_exiting_cleanly_on_sigterm

    return run_exiting_cleanly_on_sigterm(_run, args, "niche.validator")


def _run(args: argparse.Namespace) -> int:
    from niche.commands.logging_args import setup_logging_from_args
    from niche.errors import ConfigError

    if args.netuid is None:  # before logging's set-up imports the model libraries (seconds)
        raise ConfigError("--netuid is required")
    setup_logging_from_args(args, "niche-validator")
    from niche.commands.startup import configuration_errors, open_chain

    # Configuration first, each error one line and exit 2 (pm2 holds it), before minutes
    # of model loading: flags, ports, models, wallet and hotkey, chain file and subnet.
    with configuration_errors():
        config = build_config(args)
        from niche.commands.engine_args import check_threads
        from niche.commands.metrics_args import check_metrics_port
        from niche.commands.startup import check_distinct_ports

        check_distinct_ports(("--metrics.port", getattr(args, "metrics_port", None)),
                             ("--dashboard.port", getattr(args, "dashboard_port", None)))
        check_threads(args)
        if config.prompts_file is not None:  # a bad file: one line now, not after loading
            from niche.validator.prompts import PromptSource

            PromptSource.from_file(config.prompts_file)
        check_metrics_port(args)  # a busy port: one line now, not after the models load
        if getattr(args, "dashboard_port", None) is not None:
            from niche.local_server import check_port_free

            check_port_free(args.dashboard_host, args.dashboard_port, "--dashboard.port")
        from niche.commands.engine_args import (
            model_dirs_from_args,
            model_root_from_args,
            quants_from_args,
        )
        from niche.models.variants import check_models

        check_models(list(config.models), model_root_from_args(args),
                     model_dirs_from_args(args), quants_from_args(args))
    from niche.chain.registration import require_permit
    from niche.commands.chain_args import wallet_from_args
    from niche.commands.engine_args import engine_from_args
    from niche.validator.client import MinerClient
    from niche.validator.service import Validator, version_key
    from niche.validator.state import (
        ValidatorState,
        default_state_path,
        legacy_state_notice,
        require_free_space,
    )

    with configuration_errors():
        wallet = wallet_from_args(args)
    chain = open_chain(args, config.netuid)
    try:
        # Cheap checks first: the registration, before minutes of loading.
        hotkey = wallet.hotkey.ss58_address
        neuron = chain.metagraph(config.netuid).require(hotkey, "validator")
        if not config.wait_for_permit:
            require_permit(neuron, config.netuid)  # before minutes of model loading
        if not config.version_key:
            config.version_key = version_key()
        if config.state_path is None:
            config.state_path = default_state_path(chain.network, config.netuid, hotkey)
            notice = legacy_state_notice(config.state_path)
            if notice:
                logging.getLogger("niche.validator").warning("%s", notice)
        with configuration_errors():  # a bad or foreign state file: exit 2, pm2 holds it
            state = ValidatorState(config.state_path)
            try:
                state.bind(chain.network, config.netuid, hotkey)
                # its disk and first write now, not after minutes of loading: a full disk
                # is one line and exit 2 here, not a model reload per pm2 restart
                require_free_space(config.state_path)
                state.record_round_interval(config.round_interval)
                if config.organic_queue is not None:
                    from niche.validator.organic import check_queue_file

                    check_queue_file(config.organic_queue)
            except BaseException:
                state.close()
                raise
        with state:
            log_resume(state, config.netuid, hotkey)
            from niche.commands.dashboard_args import dashboard_from_args

            dashboard = dashboard_from_args(args, config.state_path)
            try:
                logging.getLogger("niche.validator").info(
                    "loading %s (the step check's reference engine)", ", ".join(config.models))
                engine = engine_from_args(args, config.models)
                extra = [engine_from_args(args, config.models, dtype=dtype)
                         for dtype in extra_dtypes(args, engine, config.models)]
                for line in unheld_default_dtypes(engine, extra, config.models):
                    logging.getLogger("niche.validator").warning("%s", line)
                validator = Validator(config, chain, wallet, engine, MinerClient(wallet), state,
                                      extra_engines=extra)
                from niche.commands.metrics_args import metrics_server_from_args

                metrics = metrics_server_from_args(args, validator.metrics.registry)
                try:
                    return validator.run()
                finally:
                    if metrics is not None:
                        metrics.close()
            finally:
                if dashboard is not None:
                    dashboard.close()
    finally:
        chain.close()


def log_resume(state, netuid: int, hotkey: str) -> None:
    """The resume line; for a new file, a WARNING naming this netuid and hotkey's file under
    another network folder (the network spelled differently must not silently restart at
    round 0)."""
    from niche.validator.state import other_network_notice

    log = logging.getLogger("niche.validator")
    log.info("%s", resume_line(state))
    notice = other_network_notice(state.path, netuid, hotkey) if state.round_index == 0 else None
    if notice:
        log.warning("%s", notice)


def resume_line(state) -> str:
    """The start-up line saying which state file is used and where it resumes."""
    done = state.round_index
    if done == 0:
        return f"state file {state.path}: new, starting at round 0"
    last = state.last_weights()
    weights = (f", last weights at round {last.round} (block {last.block})" if last
               else ", no weights set yet")
    return (f"state file {state.path}: resuming at round {done} ({done} round(s) completed"
            f"{weights})")
