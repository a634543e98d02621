#!/usr/bin/env python3
"""Regenerate the allowed `config` keys in charts/flywheel/values.schema.json from the settings classes.

Each service's `<service>.config` accepts exactly that service's settings fields (the shared
`ServiceSettings` ones included); the top-level `config`, rendered into every service's ConfigMap,
accepts the fields of any service. Keys the chart sets itself (ports, Kafka, home) stay refused
by the schema's `not` clause. A test runs this with --check, so the chart cannot drift from the code.

    PYTHONPATH=services python deploy/tools/gen_chart_config_schema.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[2] / "charts" / "flywheel" / "values.schema.json"


def allowed_keys() -> dict[str, list[str]]:
    """Allowed `config` keys: per service, and "" for the top-level (shared) config."""
    from flywheel.docs import settings_classes

    per_service = {name: sorted(cls.model_fields) for name, cls in settings_classes().items()}
    per_service[""] = sorted({key for keys in per_service.values() for key in keys})
    return per_service


def regenerate(schema: dict) -> dict:
    props = schema["properties"]
    for service, keys in allowed_keys().items():
        node = props["config"] if not service else props[service]["properties"]["config"]
        chart_owned = {clause["required"][0] for clause in node.get("not", {}).get("anyOf", [])}
        node["propertyNames"] = {"enum": [key for key in keys if key not in chart_owned]}
    return schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema is out of date")
    args = parser.parse_args()
    current = SCHEMA.read_text()
    fresh = json.dumps(regenerate(json.loads(current)), indent=2) + "\n"
    if args.check:
        if fresh != current:
            print(f"{SCHEMA} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
