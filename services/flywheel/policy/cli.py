"""`flywheel policy ...`: sample from a policy checkpoint in-process (no server, no Kafka)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flywheel.runtime.keys_cli import add_key_commands

app = typer.Typer(help="Policy service tools.", no_args_is_help=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="User message (the chat template is applied)."),
    n: int = typer.Option(1, min=1, help="Candidates."),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, min=0),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    max_new_tokens: int = typer.Option(64, min=1),
    seed: Optional[int] = typer.Option(None, min=0),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    model_dir: Optional[Path] = typer.Option(None, help="Checkpoint dir (default: SmolLM2-135M-Instruct)."),
    version: str = typer.Option("policy-0000"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per candidate, with token ids and logprobs."),
) -> None:
    """Sample candidates with their behaviour logprobs, exactly as the service would."""
    from flywheel.policy.engine import PolicyEngine
    from flywheel.policy.sampling import SamplingConfig, SamplingDefaults

    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p or 1.0, max_new_tokens=max_new_tokens,
                            stop=tuple(stop), seed=seed, n=n).validate(SamplingDefaults(max_n=1024,
                                                                                         max_new_tokens_limit=8192))
    engine = PolicyEngine.from_checkpoint(model_dir, version)
    [group] = engine.generate([prompt], config)
    for i, seq in enumerate(group):
        if as_json:
            typer.echo(json.dumps({"candidate": i, "text": seq.text, "finish_reason": seq.finish_reason,
                                   "policy_version": seq.policy_version, "token_ids": seq.token_ids,
                                   "logprobs": seq.logprobs, "seed": seq.seed_used}))
        else:
            total = sum(seq.logprobs)
            typer.echo(f"[{i}] ({seq.finish_reason}, {len(seq.token_ids)} tokens, sum logprob {total:.2f}) {seq.text}")


def _settings():  # noqa: ANN202
    from flywheel.policy.settings import PolicySettings

    return PolicySettings()


add_key_commands(app, "generate", _settings)
