"""`flywheel <service> issue-key | list-keys | revoke-key`: API keys for the reward, policy and
trainer services (one key database; a key's scopes decide what it may call)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import typer

DB_HELP = "Key database (default: FLYWHEEL_AUTH_KEYS_DB or <home>/auth/keys.sqlite)."


def add_key_commands(app: typer.Typer, default_scope: str, settings_factory: Callable[[], object]) -> None:
    """Add the key commands to a service's CLI; `default_scope` is what its APIs need."""

    def store(db: Optional[Path]):  # type: ignore[no-untyped-def]
        from flywheel.runtime.auth import TokenStore

        return TokenStore(db or settings_factory().api_keys_path())  # type: ignore[attr-defined]

    @app.command("issue-key")
    def issue_key(owner: str = typer.Option(..., "--owner", help="Who the key is for (an app or team name); "
                                            "metrics and logs show it."),
                  scope: list[str] = typer.Option([default_scope], "--scope",
                                                  help="score, generate, admin, rater (repeat for several)."),
                  requests_per_s: float = typer.Option(0.0, min=0.0, help="Requests/s quota (0: service default)."),
                  items_per_s: float = typer.Option(0.0, min=0.0, help="Items/s quota (0: service default)."),
                  label: str = typer.Option("", help="Free-form note."),
                  db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)) -> None:
        """Issue an API key; it is printed once and only its SHA-256 is stored."""
        keys = store(db)
        try:
            typer.echo(keys.issue(owner, scope=scope, label=label, requests_per_s=requests_per_s,
                                  items_per_s=items_per_s))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        finally:
            keys.close()

    @app.command("list-keys")
    def list_keys(db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)) -> None:
        """List keys: id (hash prefix), owner, scopes, quotas, status."""
        keys = store(db)
        try:
            for k in keys.list():
                status = "revoked" if k.revoked_at else "active"
                created = time.strftime("%Y-%m-%d", time.gmtime(k.created_at))
                typer.echo(f"{k.token_prefix}  {k.rater_id:20s} {k.scope:16s} {k.requests_per_s:g} req/s "
                           f"{k.items_per_s:g} items/s  {status:8s} {created} {k.label}")
        finally:
            keys.close()

    @app.command("revoke-key")
    def revoke_key(key_id: Optional[str] = typer.Option(None, "--id", help="Key id as list-keys shows it."),
                   owner: Optional[str] = typer.Option(None, "--owner", help="Revoke every key of this owner."),
                   db: Optional[Path] = typer.Option(None, "--db", help=DB_HELP)) -> None:
        """Revoke keys (effective on the next call)."""
        if (key_id is None) == (owner is None):
            raise typer.BadParameter("give exactly one of --id or --owner")
        keys = store(db)
        try:
            n = keys.revoke_rater(owner) if owner is not None else keys.revoke_key_id(key_id or "")
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        finally:
            keys.close()
        typer.echo(f"revoked {n} key(s)")
        if n == 0:
            raise typer.Exit(1)
