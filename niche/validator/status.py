"""`niche validator status`: what a validator's state file holds (scores, exclusions, last
round, last weights), read without a chain or models, while the validator runs or not: it
opens the file read-only (`mode=ro`), so it needs no write access and never takes or waits
for the running validator's lock."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from niche.errors import ConfigError
from niche.validator.scoring import ScoringConfig
from niche.validator.state import StateError, ValidatorState


def open_given_state(path: Path) -> ValidatorState:
    """The state file a reader's --state names, read-only; ConfigError (one line, exit 2)
    when it is missing, not SQLite, another program's file or damaged."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no validator state at {path}: pass --state with the validator's "
                          "--neuron.state_path")
    try:
        return ValidatorState(path, read_only=True)
    except StateError as exc:  # said for the validator: here the file comes from --state
        raise ConfigError(str(exc).replace("pass another --neuron.state_path",
                                           "pass another --state")) from None


def read_status(path: Path) -> dict[str, Any]:
    """The state file's summary as plain data (`--json` prints it as is)."""
    path = Path(path).expanduser()
    with open_given_state(path) as state:
        rounds = state.round_index
        book = state.load_book(ScoringConfig())
        weights = state.last_weights()
        latest = state.history(limit=1)
        last = latest[0].round if latest else None
        outcomes = {row.uid: row for row in state.history(limit=10_000) if row.round == last}
    return {
        "state": str(path),
        "rounds_completed": rounds,
        "last_round": last,
        "scores": [
            {"uid": uid, "hotkey": s.hotkey, "model": s.model, "score": round(s.score, 6),
             "last_status": outcomes[uid].status if uid in outcomes else None,
             "excluded_until": book.excluded_until.get(s.hotkey)}
            for uid, s in sorted(book.uids.items())
        ],
        "exclusions": [{"hotkey": hotkey, "until_round": until}
                       for hotkey, until in sorted(book.excluded_until.items())
                       if until > rounds],
        "last_weights": None if weights is None else {
            "round": weights.round, "block": weights.block, "message": weights.message,
            "weights": {str(uid): round(w, 6) for uid, w in sorted(weights.weights.items())}},
    }


def format_status(status: dict[str, Any]) -> str:
    """The human table."""
    last = status["last_round"]
    lines = [f"validator state {status['state']}: {status['rounds_completed']} round(s) "
             f"completed, last round {last if last is not None else '-'}"]
    w = status["last_weights"]
    lines.append("last weights: -" if w is None else
                 f"last weights: round {w['round']}, block {w['block']}, {len(w['weights'])} "
                 f"uid(s) ({w['message'] or 'ok'})")
    lines.append(f"{'uid':>4}  {'hotkey':<12} {'model':<13} {'score':>8} {'weight':>7}  "
                 f"{'last status':<17} excluded until")
    weights = w["weights"] if w else {}
    for row in status["scores"]:
        hotkey = row["hotkey"]
        short = hotkey if len(hotkey) <= 12 else f"{hotkey[:6]}..{hotkey[-4:]}"
        weight = weights.get(str(row["uid"]))
        lines.append(
            f"{row['uid']:>4}  {short:<12} {(row['model'] or '-'):<13} {row['score']:>8.4f} "
            f"{'-' if weight is None else f'{weight:.4f}':>7}  "
            f"{(row['last_status'] or '-'):<17} "
            f"{row['excluded_until'] if row['excluded_until'] is not None else '-'}")
    if status["exclusions"]:
        lines.append("excluded: " + ", ".join(f"{e['hotkey'][:8]}.. until round "
                                              f"{e['until_round']}"
                                              for e in status["exclusions"]))
    return "\n".join(lines)
