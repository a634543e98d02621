"""`python -m flywheel.preference`: run the preference service (same as `flywheel serve preference`)."""

import asyncio
import logging

from flywheel.preference.app import Settings, serve
from flywheel.runtime.process import start_service_process

if __name__ == "__main__":
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_service_process(settings)
    asyncio.run(serve(settings))
