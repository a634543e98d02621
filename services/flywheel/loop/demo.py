"""`flywheel demo`: the main job, run locally on a single-node Kafka that the demo starts itself."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flywheel.bus import ensure_topics, topics
from flywheel.bus.consumer import TypedConsumer
from flywheel.bus.producer import TypedProducer
from flywheel.loop.local import LocalCluster
from flywheel.loop.prompts import load_prompts, to_proto
from flywheel.v1 import common_pb2

console = Console()
log = logging.getLogger(__name__)


def demo(
    run_dir: Path = typer.Option(None, help="Where logs, state and the report go (default runs/demo-<time>)."),
    prompts: int = typer.Option(32, help="Training prompts fed into the loop."),
    bootstrap_servers: str = typer.Option("", help="Use this running Kafka instead of starting one."),
) -> None:
    """Run the loop locally: Kafka, topics, prompts through the bus, and a report."""
    logging.basicConfig(level="WARNING")
    run_dir = run_dir or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    with LocalCluster(run_dir) as cluster:
        console.print(f"[bold]flywheel demo[/] run dir: {run_dir}")
        bootstrap = cluster.start_kafka(bootstrap_servers or None)
        console.print(f"kafka: {bootstrap}")
        created = ensure_topics(bootstrap)
        console.print(f"topics: {len(created)} created")
        producer = TypedProducer(bootstrap, client_id="flywheel-demo")
        corpus = [p for p in load_prompts() if p.split == "train"][:prompts]
        sampling = common_pb2.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=32, n=4)
        for p in corpus:
            producer.send(topics.PROMPTS, to_proto(p, sampling), key=p.prompt_id)
        producer.flush()
        consumer = TypedConsumer(topics.PROMPTS, bootstrap_servers=bootstrap, group_id="flywheel-demo",
                                 dead_letters=producer)
        seen = []
        deadline = time.monotonic() + 60
        while len(seen) < len(corpus) and time.monotonic() < deadline:
            seen.extend(consumer.poll(timeout_ms=500))
        consumer.commit()
        consumer.close()
        producer.close()
        table = Table(title="prompts through flywheel.prompts.v1")
        table.add_column("prompt id")
        table.add_column("category")
        table.add_column("text")
        for d in seen[:10]:
            table.add_row(d.value.prompt_id, d.value.metadata.get("category", ""), d.value.text)
        console.print(table)
        console.print(f"{len(seen)}/{len(corpus)} prompts round-tripped through Kafka")
