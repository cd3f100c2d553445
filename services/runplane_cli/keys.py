"""``runplane keys create|ls|revoke|rotate`` and ``runplane db upgrade``: straight against
RUNPLANE_DATABASE_URL, through the scheduler's key store (no scheduler needs to run)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from runplane import ConfigurationError
from runplane_cli import fail
from runplane_common.config import SchedulerSettings
from runplane_common.errors import ServiceError
from runplane_core.durations import DurationError, seconds
from runplane_scheduler import keys as key_store
from runplane_scheduler.store import tables as db


def keys(args: argparse.Namespace) -> int:
    """``runplane keys ...``."""
    settings = SchedulerSettings.from_env()
    if args.keys_command == "rotate":
        args.grace_ms = _grace_ms(args.grace)

    async def run() -> int:
        engine = db.create_engine(settings.database_url)
        try:
            await db.upgrade(engine)
            return await _keys_command(engine, args)
        except ServiceError as error:
            return fail(error.message)
        finally:
            await engine.dispose()

    return asyncio.run(run())


async def _keys_command(engine: AsyncEngine, args: argparse.Namespace) -> int:
    command = args.keys_command
    if command == "create":
        print(
            await key_store.create_key(engine, args.env, args.kind, args.execute, args.name or "")
        )
        return 0
    if command == "ls":
        keys = await key_store.list_keys(engine, args.env)
        if args.json:
            print(orjson.dumps([_key_dict(k) for k in keys], option=orjson.OPT_INDENT_2).decode())
            return 0
        print(
            f"{'ID':<30} {'ENV':<8} {'KIND':<7} {'RIGHTS':<12} {'CREATED':<20} {'REVOKED':<25} NAME"
        )
        for k in keys:
            d = _key_dict(k)
            revoked = d["revoked_at"] or "-"
            if d["revoked_at"] and not d["revoked"]:
                revoked = f"from {revoked}"  # a rotated key's grace
            print(
                f"{k.id:<30} {k.environment:<8} {k.kind:<7} {','.join(d['rights']):<12} "
                f"{d['created_at']:<20} {revoked:<25} {k.name}"
            )
        return 0
    if command == "revoke":
        key = await key_store.revoke_key(engine, args.key_id)
        print(f"{key.id} revoked at {_iso(key.revoked_at)}", file=sys.stderr)
        return 0
    new_key, old = await key_store.rotate_key(engine, args.key_id, args.grace_ms)
    print(new_key)
    when = "works until" if args.grace_ms else "revoked at"
    print(f"{old.id} {when} {_iso(old.revoked_at)}", file=sys.stderr)
    return 0


def _grace_ms(text: str | None) -> int:
    if not text:
        return 0
    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    try:
        return round(seconds(value, "--grace") * 1000)
    except DurationError as error:
        raise ConfigurationError(str(error)) from None


def _iso(ms: int | None) -> str:
    if ms is None:
        return ""
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _key_dict(key: key_store.KeyInfo) -> dict[str, Any]:
    """A key as ``keys ls`` shows it; the key itself and its hash are never stored or shown."""
    return {
        "id": key.id,
        "env": key.environment,
        "kind": key.kind,
        "rights": sorted(key.rights),
        "name": key.name,
        "created_at": _iso(key.created_at),
        "revoked_at": _iso(key.revoked_at) or None,
        "revoked": key.revoked(int(time.time() * 1000)),
    }


def db_upgrade(_args: argparse.Namespace) -> int:
    """``runplane db upgrade``."""
    url = SchedulerSettings.from_env().database_url
    db.upgrade_url(url)
    print("database is up to date", file=sys.stderr)
    return 0
