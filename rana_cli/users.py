"""``rana user``: team mode's accounts (jobs.accounts). Passwords are asked twice at the terminal, or read as one
line from standard input with --password-stdin (scripts); they are never echoed, logged or stored in clear."""

from __future__ import annotations

import getpass
import json
import sys

from rana_core.errors import RanaError


def add_user_parser(commands) -> None:
    user = commands.add_parser("user", help="team mode's accounts: add, list, passwd, disable, enable, role")
    actions = user.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add an account")
    add.add_argument("name")
    add.add_argument("--role", default="viewer", help="viewer (reads), runner (also queues and manages own jobs) "
                                                      "or admin (everything)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--oidc", action="store_true", help="no password: the account signs in through the identity "
                                                         "provider ([auth] in .streamlit/secrets.toml); NAME is the "
                                                         "email it reports")
    listing = actions.add_parser("list", help="list accounts")
    listing.add_argument("--json", action="store_true")
    passwd = actions.add_parser("passwd", help="set an account's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    for name, text in (("disable", "stop an account from signing in"), ("enable", "let it sign in again")):
        actions.add_parser(name, help=text).add_argument("name")
    role = actions.add_parser("role", help="change an account's role")
    role.add_argument("name")
    role.add_argument("role")


def cmd_user(args) -> int:
    from db.migrate import check_schema
    from jobs import accounts

    check_schema()
    if args.action == "add":
        accounts.add_user(args.name, None if args.oidc else _password(args), args.role)
        print(f"added {args.name} ({args.role})")
    elif args.action == "list":
        users = accounts.list_users()
        if args.json:
            print(json.dumps([{**u, "created_at": str(u["created_at"])} for u in users]))
        for u in [] if args.json else users:
            print(f"{u['name']:<24} {u['role']:<8} {'disabled' if u['disabled'] else 'enabled'}")
    elif args.action == "passwd":
        accounts.set_password(args.name, _password(args))
        print(f"password of {args.name} changed")
    elif args.action in ("disable", "enable"):
        accounts.set_disabled(args.name, args.action == "disable")
        print(f"{args.name} {args.action}d")
    else:
        accounts.set_role(args.name, args.role)
        print(f"{args.name} is now {args.role}")
    return 0


def _password(args) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise RanaError("the two passwords differ")
    return first
