"""`python -m flywheel.trainer`: run the trainer service (same as `flywheel serve trainer`)."""

import asyncio
import faulthandler
import logging
import signal

from flywheel.runtime.process import start_service_process
from flywheel.trainer.app import Settings, serve


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_service_process(settings)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
