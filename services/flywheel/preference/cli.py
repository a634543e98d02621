"""`flywheel preference ...`: rater tokens, dataset export and simulated raters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Preference service: rater tokens, datasets, simulated raters.", no_args_is_help=True)


def _tokens(db: Optional[Path]):
    from flywheel.preference.auth import TokenStore
    from flywheel.preference.settings import PreferenceSettings

    return TokenStore(db or PreferenceSettings().auth_db_path())


DB_OPTION = typer.Option(None, "--db", help="Token database (default: FLYWHEEL_PREFERENCE_AUTH_DB_PATH or "
                                             "<home>/preference/auth.sqlite).")


@app.command("issue-token")
def issue_token(rater: str = typer.Option(..., "--rater", help="Rater id the token submits as."),
                admin: bool = typer.Option(False, "--admin", help="May also export datasets."),
                label: str = typer.Option("", help="Free-form note (who, where)."),
                db: Optional[Path] = DB_OPTION) -> None:
    """Issue a bearer token; it is printed once and only its SHA-256 is stored."""
    store = _tokens(db)
    try:
        typer.echo(store.issue(rater, scope="admin" if admin else "rater", label=label))
    finally:
        store.close()


@app.command("revoke-token")
def revoke_token(rater: Optional[str] = typer.Option(None, "--rater", help="Revoke every token of this rater."),
                 token: Optional[str] = typer.Option(None, "--token", help="Revoke this one token."),
                 db: Optional[Path] = DB_OPTION) -> None:
    """Revoke tokens (effective on the next RPC)."""
    if (rater is None) == (token is None):
        raise typer.BadParameter("give exactly one of --rater or --token")
    store = _tokens(db)
    try:
        n = store.revoke_rater(rater) if rater is not None else int(store.revoke_token(token or ""))
    finally:
        store.close()
    typer.echo(f"revoked {n} token(s)")
    if n == 0:
        raise typer.Exit(1)


@app.command("list-tokens")
def list_tokens(db: Optional[Path] = DB_OPTION) -> None:
    """List tokens (hash prefix, rater, scope, status)."""
    store = _tokens(db)
    try:
        for t in store.list():
            status = "revoked" if t.revoked_at else "active"
            typer.echo(f"{t.token_prefix}  {t.rater_id:24s} {t.scope:6s} {status:8s} {t.label}")
    finally:
        store.close()


@app.command("export")
def export(target: str = typer.Option("127.0.0.1:50053", help="Preference service address."),
           token: str = typer.Option(..., envvar="FLYWHEEL_PREFERENCE_TOKEN", help="Admin bearer token."),
           fmt: str = typer.Option("jsonl", "--format", help="jsonl or parquet."),
           output_uri: str = typer.Option("", help="Directory (fsspec URI); empty: the service's export dir."),
           min_margin: float = typer.Option(0.0, help="Drop pairs with a smaller consensus margin."),
           publish: bool = typer.Option(False, help="Also publish to flywheel.aggregated-preferences.v1.")) -> None:
    """Ask the service to export the reward-model pairs and SFT demonstrations."""
    from flywheel.v1 import preference_pb2, preference_pb2_grpc

    formats = {"jsonl": preference_pb2.DATASET_FORMAT_JSONL, "parquet": preference_pb2.DATASET_FORMAT_PARQUET}
    if fmt not in formats:
        raise typer.BadParameter("--format must be jsonl or parquet")
    from flywheel.runtime.client import cli_channel

    with cli_channel(target) as channel:
        resp = preference_pb2_grpc.PreferenceServiceStub(channel).ExportDataset(
            preference_pb2.ExportDatasetRequest(format=formats[fmt], output_uri=output_uri, min_margin=min_margin,
                                                publish=publish),
            metadata=(("authorization", f"Bearer {token}"),), timeout=600)
    from google.protobuf.json_format import MessageToDict

    typer.echo(json.dumps(MessageToDict(resp), indent=2))


@app.command("simulate")
def simulate(target: str = typer.Option("127.0.0.1:50053", help="Preference service address."),
             raters: int = typer.Option(6, help="Pool size."),
             raters_per_prompt: int = typer.Option(3, help="Raters ranking each prompt."),
             adversarial_fraction: float = typer.Option(0.0, help="Fraction of adversarial raters."),
             random_fraction: float = typer.Option(0.0, help="Fraction of random (low-quality) raters."),
             noise: float = typer.Option(0.1, help="Std of the Gaussian noise on the VADER ground truth."),
             max_prompts: Optional[int] = typer.Option(None, help="Stop after rating this many prompts."),
             timeout_s: Optional[float] = typer.Option(None, help="Stop after this many seconds."),
             db: Optional[Path] = DB_OPTION) -> None:
    """Run simulated raters on the rollouts topic (tokens are issued into the token database)."""
    from flywheel.bus import consumer_for, producer_for
    from flywheel.bus.topics import ROLLOUTS
    from flywheel.preference.settings import PreferenceSettings
    from flywheel.preference.simulated_rater import RaterClient, SimulatedRaterRunner, make_pool

    settings = PreferenceSettings()
    pool = make_pool(raters, adversarial_fraction=adversarial_fraction, random_fraction=random_fraction, noise=noise)
    store = _tokens(db)
    clients = [(r, RaterClient(target, store.issue(r.rater_id, label="simulated"))) for r in pool]
    store.close()
    producer = producer_for(settings)
    consumer = consumer_for(settings, ROLLOUTS, "flywheel-simulated-raters", producer)
    runner = SimulatedRaterRunner(consumer, clients, raters_per_prompt=raters_per_prompt)
    try:
        runner.run(max_prompts=max_prompts, timeout_s=timeout_s)
    finally:
        consumer.close()
        producer.close()
        for _, c in clients:
            c.close()
    typer.echo(f"rated {runner.prompts_rated} prompts: {runner.submitted} rankings ({runner.duplicates} duplicates)")
