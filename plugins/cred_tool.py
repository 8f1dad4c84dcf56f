"""``mipsec credentials``: the ``sqlite`` credential backend's database, from the shell.

    mipsec credentials import CREDENTIALS.toml DB.sqlite [--allow-short-passphrase]
    mipsec credentials add DB.sqlite MN_ID [--generate]
    mipsec credentials remove DB.sqlite MN_ID
    mipsec credentials count DB.sqlite

README recommends the ``sqlite`` backend past about 10,000 MNs (issue 9: a
``credentials.toml`` edit re-reads the whole file); ``import`` moves a TOML
file's entries into the database with the TOML backend's own checks (an
error names the file, the entry and the key, never a key's value), in one
transaction, keys under the backend's lookup form (``nai_key``).  ``add``
reads the key as hex from standard input -- never from the command line,
where ``ps`` would show it -- or, with ``--generate``, draws 32 octets from
the CSPRNG and prints them once, for the MN's ``psk_file``.  The database
is created with mode 0600 and must stay private.  The HAC opens it read-only
and sees every change at its next lookup: no reload needed.

A plugin like any other: the command comes through ``mipsec_cli_commands``,
the hook a third party uses to add its own.
"""

from __future__ import annotations

import argparse
import secrets
import sqlite3
import sys
from pathlib import Path

from mipsec.core.hookspecs import hookimpl
from mipsec.plugins.cred_sqlite import add_psks, count_psks, remove_psk
from mipsec.plugins.cred_toml import load_credentials

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2
KEY_OCTETS = 32  # as mipsec init draws them


def _fail(message: str, status: int = EXIT_INPUT) -> int:
    print(f"mipsec credentials: {message}", file=sys.stderr)
    return status


def _key_from_stdin() -> bytes:
    text = sys.stdin.readline().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("standard input: not hexadecimal (the key, e.g. 64 hex digits)") from None
    if not key:
        raise ValueError("standard input: empty key")
    return key


class CredentialsCommand:
    name = "credentials"
    help = "manage the sqlite credential backend's database (import a TOML file, add, remove)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        p = sub.add_parser("import", help="copy every entry of a credentials.toml into DB")
        p.add_argument("toml", help="a credentials.toml ([[mn]] mn_id, psk_hex or psk)")
        p.add_argument("db", help="the SQLite database (created 0600 if missing)")
        p.add_argument(
            "--allow-short-passphrase",
            action="store_true",
            help="accept psk passphrases under 20 characters (as the backend option)",
        )
        p = sub.add_parser("add", help="add or replace MN_ID's key (hex on standard input)")
        p.add_argument("db")
        p.add_argument("mn_id")
        p.add_argument(
            "--generate",
            action="store_true",
            help=f"draw a new {KEY_OCTETS}-octet key and print it (hex) once",
        )
        p = sub.add_parser("remove", help="delete MN_ID's key")
        p.add_argument("db")
        p.add_argument("mn_id")
        p = sub.add_parser("count", help="how many keys DB holds")
        p.add_argument("db")

    def run(self, args: argparse.Namespace) -> int:
        try:
            return self._run(args)
        except (ValueError, OSError, sqlite3.Error) as exc:
            # ValueError: a bad entry or an insecure file (says which and the fix).
            return _fail(f"{args.db}: {exc}" if isinstance(exc, sqlite3.Error) else str(exc))

    @staticmethod
    def _run(args: argparse.Namespace) -> int:
        db = Path(args.db)
        if args.action == "import":
            table = load_credentials(
                Path(args.toml), allow_short_passphrase=args.allow_short_passphrase
            )
            new, replaced = add_psks(db, table.items())
            print(
                f"{db}: {new + replaced} entries from {args.toml} "
                f"({new} new, {replaced} replaced); {count_psks(db)} in all"
            )
            return EXIT_OK
        if args.action == "add":
            key = secrets.token_bytes(KEY_OCTETS) if args.generate else _key_from_stdin()
            new, _ = add_psks(db, [(args.mn_id, key)])
            print(f"{db}: {args.mn_id} {'added' if new else 'replaced'}", file=sys.stderr)
            if args.generate:
                print(key.hex())  # the one place the key is shown: for the MN's psk_file
            return EXIT_OK
        if args.action == "remove":
            if not remove_psk(db, args.mn_id):
                return _fail(f"{db}: no key for {args.mn_id!r}", EXIT_FAILED)
            print(f"{db}: {args.mn_id} removed")
            return EXIT_OK
        print(count_psks(db))
        return EXIT_OK


@hookimpl
def mipsec_cli_commands() -> list[CredentialsCommand]:
    return [CredentialsCommand()]
