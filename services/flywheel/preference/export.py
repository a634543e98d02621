"""Training datasets: preference pairs (reward model) and demonstrations (SFT), as JSONL or Parquet.

Layout under the output directory (any fsspec URI; a plain path means the local filesystem):

    <dataset_version>/pairs.{jsonl,parquet}           prompt_id, prompt_text, chosen_id, chosen_text,
                                                      rejected_id, rejected_text, margin
    <dataset_version>/demonstrations.{jsonl,parquet}  prompt_id, prompt_text, response_text, rater_id, event_id
    <dataset_version>/manifest.json                   version, counts, format, min_margin, created_at

Pair fields are exactly the PreferencePair proto field names; the reward-model trainer reads these
files. Files are written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.v1 import common_pb2

PAIR_FIELDS = ("prompt_id", "prompt_text", "chosen_id", "chosen_text", "rejected_id", "rejected_text", "margin")
DEMONSTRATION_FIELDS = ("prompt_id", "prompt_text", "response_text", "rater_id", "event_id")

PAIR_SCHEMA = pa.schema([(f, pa.float64() if f == "margin" else pa.string()) for f in PAIR_FIELDS])
DEMONSTRATION_SCHEMA = pa.schema([(f, pa.string()) for f in DEMONSTRATION_FIELDS])


@dataclass
class ExportResult:
    dataset_version: str
    pairs_uri: str
    demonstrations_uri: str
    num_pairs: int
    num_demonstrations: int
    num_prompts: int


def pair_rows(aggregated: Iterable[common_pb2.AggregatedPreference], min_margin: float = 0.0) -> list[dict]:
    rows = []
    for agg in aggregated:
        for p in agg.pairs:
            if p.margin >= min_margin:
                rows.append({f: getattr(p, f) for f in PAIR_FIELDS})
    return rows


def _write(fs, path: str, rows: list[dict], schema: pa.Schema, fmt: str) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as fh:
        if fmt == "parquet":
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, fh)
        else:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    fs.mv(tmp, path)


def write_dataset(output_uri: str, dataset_version: str, aggregated: Sequence[common_pb2.AggregatedPreference],
                  demonstrations: Sequence[tuple[str, str, str, str, str]], *, fmt: str = "jsonl",
                  min_margin: float = 0.0) -> ExportResult:
    """Write pairs and demonstrations; `demonstrations` rows are (event_id, prompt_id, prompt_text, response_text, rater_id)."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown format {fmt!r}")
    fs, root = fsspec.core.url_to_fs(output_uri)
    directory = f"{root.rstrip('/')}/{dataset_version}"
    fs.makedirs(directory, exist_ok=True)
    pairs = pair_rows(aggregated, min_margin)
    demos = [{"prompt_id": p, "prompt_text": pt, "response_text": r, "rater_id": rater, "event_id": e}
             for e, p, pt, r, rater in demonstrations]
    pairs_path = f"{directory}/pairs.{fmt}"
    demos_path = f"{directory}/demonstrations.{fmt}"
    _write(fs, pairs_path, pairs, PAIR_SCHEMA, fmt)
    _write(fs, demos_path, demos, DEMONSTRATION_SCHEMA, fmt)
    manifest = {"dataset_version": dataset_version, "format": fmt, "min_margin": min_margin,
                "num_pairs": len(pairs), "num_demonstrations": len(demos), "num_prompts": len(aggregated),
                "pair_fields": list(PAIR_FIELDS), "demonstration_fields": list(DEMONSTRATION_FIELDS),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with fs.open(f"{directory}/manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=2)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    uri = (lambda p: p if protocol == "file" else f"{protocol}://{p}")
    return ExportResult(dataset_version, uri(pairs_path), uri(demos_path), len(pairs), len(demos), len(aggregated))


def read_pairs(path: str) -> list[dict]:
    """Read a pairs file back (JSONL or Parquet by extension); used by tests and consumers alike."""
    fs, p = fsspec.core.url_to_fs(path)
    if p.endswith(".parquet"):
        with fs.open(p, "rb") as fh:
            return pq.read_table(fh).to_pylist()
    with fs.open(p, "rb") as fh:
        return [json.loads(line) for line in fh if line.strip()]
