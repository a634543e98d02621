"""`python tests/preference_hang_server.py HANG_FILE`: the preference service (settings from the
environment) with a fault hook injected through its constructor: after the broker acknowledged an
event it creates HANG_FILE and hangs before storing and acknowledging, so test_preference_crash.py
can kill -9 it exactly between produce and ack. Production code has no such setting."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from flywheel.preference.app import build_service
from flywheel.preference.settings import PreferenceSettings


def main(hang_file: Path) -> None:
    async def hang_after_produce() -> None:
        hang_file.write_text("acknowledged by the broker, not yet stored or acknowledged to the client\n")
        logging.warning("fault hook: hanging after produce (waiting to be killed)")
        await asyncio.Event().wait()

    settings = PreferenceSettings()
    logging.basicConfig(level=settings.log_level.upper())
    runtime = build_service(settings, after_produce=hang_after_produce).runtime
    asyncio.run(runtime.serve())  # SERVING once its store caught up (readiness conditions)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
