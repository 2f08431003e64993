"""`rebasin keys`: managed API keys, straight in the database the server uses (REBASIN_DATABASE_URL, else the
embedded one under the data directory). Revocations reach running servers at once through Redis when the broker
is Redis, else within REBASIN_AUTH_CACHE_S."""

import json
from datetime import datetime, timedelta

from sqlalchemy import select

from cli.errors import CommandError, UsageError
from cli.service import _settings, prepare_database


def _open(args):
    from storage.db import get_sessionmaker

    settings = _settings(args)
    prepare_database(settings)
    return settings, get_sessionmaker(settings.resolved_database_url())()


def _out(row, secret: str | None = None) -> dict:
    from api.identity import key_record

    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in key_record(row, secret).items()}


def _duration(text: str | None) -> timedelta | None:
    from api.identity import parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _print(args, out: dict) -> None:
    if args.json:
        print(json.dumps(out))
    elif "secret" in out:
        print(f"{out['id']}  tenant {out['tenant']}  scope {out['scope']}  expires {out['expires_at'] or 'never'}")
        print(f"secret (shown once): {out['secret']}")
    else:
        print(f"{out['id']}  {out['status']}  tenant {out['tenant']}  scope {out['scope']}  revoked_at {out['revoked_at'] or '-'}")


def _forget(settings) -> None:
    from api.identity import Revocations

    Revocations(settings.redis_url()).bump()


def _find(session, key_id: str):
    from storage.models import ApiKey

    row = session.get(ApiKey, key_id)
    if row is None:
        raise CommandError(f"no key with id {key_id!r}")
    return row


def cmd_keys_create(args) -> None:
    from api.identity import create_key

    settings, session = _open(args)
    with session:
        row, secret = create_key(session, settings, args.tenant, args.scope, args.name or "", _duration(args.expires))
        _forget(settings)
        _print(args, _out(row, secret))


def cmd_keys_list(args) -> None:
    from storage.models import ApiKey

    _, session = _open(args)
    with session:
        query = select(ApiKey).order_by(ApiKey.created_at)
        if args.tenant:
            query = query.where(ApiKey.tenant == args.tenant)
        rows = [_out(row) for row in session.scalars(query)]
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['id']}  {row['status']:<8}  {row['scope']:<5}  {row['tenant']}  {row['name']}  "
              f"created {row['created_at']}  expires {row['expires_at'] or 'never'}")


def cmd_keys_revoke(args) -> None:
    from api.identity import revoke_key

    settings, session = _open(args)
    with session:
        row = revoke_key(session, _find(session, args.key_id))
        _forget(settings)
        _print(args, _out(row))


def cmd_keys_rotate(args) -> None:
    from api.identity import rotate_key

    settings, session = _open(args)
    with session:
        row, secret = rotate_key(session, settings, _find(session, args.key_id), _duration(args.overlap))
        _forget(settings)
        _print(args, _out(row, secret))


def add_keys_command(commands, formatter_class, epilog: str, data_dir_argument) -> None:
    keys = commands.add_parser("keys", help="manage API keys (stored hashed in the database)",
                               description="Manage API keys: stored hashed in the server's database; the secret is shown once.")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func):
        parser = sub.add_parser(name, help=help, description=help, formatter_class=formatter_class, epilog=epilog)
        parser.set_defaults(func=func)
        parser.add_argument("--json", action="store_true", help="print JSON")
        data_dir_argument(parser)
        return parser

    create = command("create", "create a key and print its secret (once)", cmd_keys_create)
    create.add_argument("--tenant", required=True, help="the tenant the key acts for")
    create.add_argument("--name", help="what the key is for")
    create.add_argument("--scope", default="write", choices=["read", "write", "admin"],
                        help="read: GET only; write: the tenant's work; admin: also keys and everyone's audit log")
    create.add_argument("--expires", metavar="DURATION", help="e.g. 90d, 12h (default: never)")
    listing = command("list", "list keys (never their secrets)", cmd_keys_list)
    listing.add_argument("--tenant", help="only this tenant's")
    revoke = command("revoke", "revoke a key: it and its browser sessions stop working at once", cmd_keys_revoke)
    revoke.add_argument("key_id", metavar="ID")
    rotate = command("rotate", "replace a key's secret; the old one keeps working for the overlap", cmd_keys_rotate)
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument("--overlap", default="1h", metavar="DURATION", help="how long the old secret keeps working")
