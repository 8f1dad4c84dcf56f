"""The operator's verbs over the control socket (core/control.py).

    mipsec status   --config FILE [--json]
    mipsec sas      --config FILE [--mn-id ID] [--json]
    mipsec bindings --config FILE [--json]
    mipsec revoke   --config FILE MN_ID        (HAC)
    mipsec unrevoke --config FILE MN_ID        (HAC)
    mipsec reload   --config FILE

Each reads the role's configuration file to find its socket (``[control]
path``, else ``<config file name>.ctl`` in its state directory).  Exit status: 0 done,
1 the role refused or is not running (one line on stderr), 2 the
configuration cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mipsec.core.config import load_config, load_toml
from mipsec.core.control import NotRunning, Request, default_name, request, socket_path
from mipsec.core.errors import ConfigError

VERBS = ("status", "sas", "bindings", "revoke", "unrevoke", "reload")
EXIT_OK, EXIT_FAILED = 0, 1


def _role(path: str, data: dict[str, Any]) -> str:
    # mn.toml also has a [hac] table, hac.toml an [[ha]] array: test in this order.
    for role in ("mn", "hac", "ha"):
        if role in data:
            return role
    raise ConfigError(path, "(top level)", "cannot tell the role: no [hac], [mn] or [ha] table")


def _raw_socket_path(file: str, role: str, data: dict[str, Any]) -> Path:
    """The socket from the raw TOML: ``mipsec reload`` must reach a role whose
    file no longer validates, so that the role itself refuses (and logs) it."""
    base = Path(file).resolve().parent
    control = data.get("control")
    if isinstance(control, dict) and isinstance(control.get("path"), str):
        return base / str(control["path"])
    name = default_name(file, role, ".ctl")
    store = data.get("sa_store")
    if isinstance(store, dict) and isinstance(store.get("path"), str):
        return (base / str(store["path"])).parent / name
    return base / name


def locate(file: str, *, lenient: bool = False) -> tuple[str, Path]:
    """(role, control socket path) of the role ``file`` configures."""
    try:
        data = load_toml(file)
    except ConfigError:
        # A file that does not even parse (an edit under way): the role that
        # read it last still runs, and a reload must reach it so that it
        # refuses and logs why (found in review: exit 2, the role never
        # asked).  Without the file, only the default socket beside it can
        # be found.
        stem = Path(file).stem or "role"
        guess = Path(file).resolve().parent / default_name(file, stem, ".ctl")
        if lenient and guess.is_socket():
            return stem, guess
        raise
    role = _role(file, data)
    try:
        cfg = load_config(file, role)
    except ConfigError:
        if not lenient:
            raise
        return role, _raw_socket_path(file, role, data)
    control = getattr(cfg, "control", None)
    if control is not None and not control.enabled:
        raise ConfigError(file, "control.enabled", "the control socket is disabled")
    return role, socket_path(cfg, role, file)


def _call(args: argparse.Namespace, cmd: str, **kwargs: Any) -> tuple[str, Any] | None:
    # Lenient: a file being edited may not validate, but the running role
    # still answers (and a reload must reach it, so that it refuses and logs).
    role, path = locate(args.config, lenient=True)
    try:
        resp = request(path, Request(cmd, kwargs))
    except NotRunning as exc:
        # The path comes from the file as it is now: a role started before
        # an edit of [control] path listens where the old file said.
        print(
            f"mipsec: {role} ({args.config}): {exc} (the socket as {args.config} names it now)",
            file=sys.stderr,
        )
        return None
    if not resp.get("ok"):
        print(f"mipsec: {role} refused: {resp.get('error', '?')}", file=sys.stderr)
        return None
    return role, resp.get("result")


# ---------------------------------------------------------------- text output


def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _flat(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_scalar(v)}" for k, v in sorted(d.items(), key=str)) or "-"


def render(d: dict[str, Any], indent: int = 0) -> list[str]:
    """A nested status object as ``key: value`` lines; small maps on one line."""
    pad = " " * indent
    out: list[str] = []
    for k, v in d.items():
        name = k.replace("_", " ")
        if isinstance(v, dict) and not any(isinstance(x, dict | list) for x in v.values()):
            out.append(f"{pad}{name}: {_flat(v)}")
        elif isinstance(v, dict):
            out.append(f"{pad}{name}:")
            out += render(v, indent + 2)
        elif isinstance(v, list):
            out.append(f"{pad}{name}: {', '.join(map(_scalar, v)) or '-'}")
        else:
            out.append(f"{pad}{name}: {_scalar(v)}")
    return out


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> list[str]:
    cells = [[h for _, h in cols]] + [[_scalar(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _emit(args: argparse.Namespace, result: Any, lines: list[str]) -> int:
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
    return EXIT_OK


# ---------------------------------------------------------------- verbs


def cmd_status(args: argparse.Namespace) -> int:
    got = _call(args, "status")
    if got is None:
        return EXIT_FAILED
    return _emit(args, got[1], render(got[1]))


SA_COLS = [
    ("spi", "SPI"),
    ("mn_id", "MN_ID"),
    ("ha", "HA"),
    ("suite", "SUITE"),
    ("scope", "SCOPE"),
    ("validity_end", "VALID_UNTIL"),
    ("hoa", "HOA"),
    ("method", "METHOD"),
]


def cmd_sas(args: argparse.Namespace) -> int:
    got = _call(args, "sas", **({"mn_id": args.mn_id} if args.mn_id else {}))
    if got is None:
        return EXIT_FAILED
    rows = got[1]["sas"]
    cols = [c for c in SA_COLS if any(c[0] in r for r in rows)] or SA_COLS
    return _emit(args, got[1], [*table(rows, cols), f"{len(rows)} live SA(s)"])


BINDING_COLS = [
    ("hoa", "HOA"),
    ("ip4_hoa", "IP4_HOA"),
    ("coa", "COA"),
    ("mn_id", "MN_ID"),
    ("spi", "SPI"),
    ("lifetime", "LIFETIME"),
    ("remaining_s", "REMAINING"),
]


def cmd_bindings(args: argparse.Namespace) -> int:
    got = _call(args, "bindings")
    if got is None:
        return EXIT_FAILED
    rows = got[1]["bindings"]
    return _emit(args, got[1], [*table(rows, BINDING_COLS), f"{len(rows)} binding(s)"])


def cmd_revoke(args: argparse.Namespace) -> int:
    got = _call(args, "revoke", mn_id=args.mn_id)
    if got is None:
        return EXIT_FAILED
    r = got[1]
    spis = ", ".join(map(str, r["withdrawn"])) or "none"
    return _emit(
        args,
        r,
        [f"{r['mn_id']} revoked: SAs withdrawn: {spis}; bootstraps refused (401) until unrevoke"],
    )


def cmd_unrevoke(args: argparse.Namespace) -> int:
    got = _call(args, "unrevoke", mn_id=args.mn_id)
    if got is None:
        return EXIT_FAILED
    r = got[1]
    what = "may bootstrap again" if r["was_revoked"] else "was not revoked"
    return _emit(args, r, [f"{r['mn_id']} {what}"])


def cmd_reload(args: argparse.Namespace) -> int:
    got = _call(args, "reload")
    if got is None:
        return EXIT_FAILED
    r = got[1]
    changed = ", ".join(r.get("changed", [])) or "nothing changed"
    return _emit(args, r, [f"{got[0]} reloaded {args.config}: {changed}"])


def add_parsers(sub: Any) -> None:
    def verb(name: str, func: Any, help_text: str, *, json_out: bool = True) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            required=True,
            metavar="FILE",
            help="the running role's configuration file (it names the control socket)",
        )
        if json_out:
            p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        p.set_defaults(func=func)
        return p

    verb(
        "status",
        cmd_status,
        "a running HAC's or HA's state: uptime, version, plugins, live SAs, bindings, counters",
    )
    p = verb("sas", cmd_sas, "list live SAs (SPI, MN, HA, suite, validity; never keys)")
    p.add_argument("--mn-id", metavar="ID", help="only this MN's SAs")
    verb("bindings", cmd_bindings, "list an HA's bindings (home address, care-of address, SPI)")
    p = verb(
        "revoke",
        cmd_revoke,
        "HAC: withdraw every live SA of an MN from its HAs and refuse its bootstraps (401) "
        "until unrevoke; persisted",
    )
    p.add_argument("mn_id", metavar="MN_ID", help="the MN's identity (mn-id)")
    p = verb("unrevoke", cmd_unrevoke, "HAC: let a revoked MN bootstrap again")
    p.add_argument("mn_id", metavar="MN_ID", help="the MN's identity (mn-id)")
    verb(
        "reload",
        cmd_reload,
        "re-read and validate the configuration file, apply what can change live (as SIGHUP does)",
    )
