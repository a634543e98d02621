"""The loop's simulated raters: a pool of `SimulatedRater`s (some adversarial) that consume policy
rollouts and submit rankings to the preference service over authenticated gRPC, on a thread."""

from __future__ import annotations

import sys

from flywheel.bus import ConsumerThread, consumer_for, producer_for, topics
from flywheel.loop.local import LocalCluster
from flywheel.preference.auth import SCOPE_ADMIN, TokenStore
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.simulated_rater import RaterClient, SimulatedRaterRunner, make_pool
from flywheel.runtime.config import ServiceSettings


def preference_tokens(cluster: LocalCluster) -> TokenStore:
    """The token store the cluster's preference service authenticates against."""
    env = cluster.services["preference"].env
    settings = PreferenceSettings(home=env["FLYWHEEL_HOME"])
    return TokenStore(settings.auth_db_path())


def admin_metadata(cluster: LocalCluster, label: str = "flywheel-loop") -> tuple[tuple[str, str], ...]:
    tokens = preference_tokens(cluster)
    try:
        token = tokens.issue(label, scope=SCOPE_ADMIN, label=label)
    finally:
        tokens.close()
    return (("authorization", f"Bearer {token}"),)


class _RaterThread(ConsumerThread):
    """The runner on the bus's consumer loop (backoff, bus metrics, bounded stop)."""

    def __init__(self, runner: SimulatedRaterRunner) -> None:
        consumer = runner.consumer
        super().__init__(name="simulated-raters", topic=consumer.topic.name, group=consumer.group_id)
        self.runner = runner
        self.error: BaseException | None = None

    def step(self) -> None:
        self.runner.run_once()

    def recover(self) -> None:
        self.error = sys.exc_info()[1]  # surfaced through RaterPool.rated_prompts()
        self.runner.consumer.rewind()

    def lag(self) -> int:
        return self.runner.consumer.lag()

    def close(self) -> None:
        self.runner.consumer.close()


class RaterPool:
    def __init__(self, cluster: LocalCluster, bootstrap: str, *, raters: int, adversarial: int, noise: float,
                 tie_threshold: float = 0.0, raters_per_prompt: int = 3) -> None:
        pool = make_pool(raters, adversarial_fraction=adversarial / max(1, raters), noise=noise,
                         tie_threshold=tie_threshold)
        tokens = preference_tokens(cluster)
        try:
            clients = [(rater, RaterClient(cluster.services["preference"].target, tokens.issue(rater.rater_id)))
                       for rater in pool]
        finally:
            tokens.close()
        settings = ServiceSettings(service_name="loop-raters", kafka_bootstrap_servers=bootstrap,
                                   kafka_consumer_group="flywheel-loop-raters", kafka_max_poll_records=256)
        self._producer = producer_for(settings)
        consumer = consumer_for(settings, topics.ROLLOUTS, None, self._producer)
        self.runner = SimulatedRaterRunner(consumer, clients, raters_per_prompt=raters_per_prompt,
                                           max_wait_s=30.0, accept=lambda r: r.split != "eval")
        self._clients = [c for _, c in clients]
        self._thread = _RaterThread(self.runner)

    def start(self) -> None:
        self._thread.start_thread()

    def _check(self) -> None:
        if self._thread.error is not None:
            raise RuntimeError(f"simulated raters failed: {self._thread.error!r}") from self._thread.error

    def rated_prompts(self) -> int:
        self._check()
        return self.runner.prompts_rated

    def rankings_submitted(self) -> int:
        return self.runner.submitted

    def stop(self) -> None:
        self.runner.stop()
        self._thread.join(30.0)  # closes the consumer on its own thread
        for client in self._clients:
            client.close()
        self._producer.close()
