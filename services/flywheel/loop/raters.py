"""The loop's simulated raters: a pool of `SimulatedRater`s (some adversarial) that lease tasks from
the preference service and submit rankings over authenticated gRPC, on a thread - exactly the path
a human rating team takes through the web UI."""

from __future__ import annotations

import threading

from flywheel.loop.local import LocalCluster
from flywheel.preference.auth import SCOPE_ADMIN, TokenStore
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.simulated_rater import LeasingRaterRunner, RaterClient, make_pool


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


def human_rater(cluster: LocalCluster, rater_id: str = "you") -> tuple[str, str]:
    """The web UI address of the cluster's preference service and a fresh rater token: a person can
    join the running loop next to the simulated raters."""
    port = cluster.services["preference"].env["FLYWHEEL_PREFERENCE_UI_PORT"]
    tokens = preference_tokens(cluster)
    try:
        token = tokens.issue(rater_id, label="demo: a human rater")
    finally:
        tokens.close()
    return f"http://127.0.0.1:{port}/", token


class RaterPool:
    def __init__(self, cluster: LocalCluster, *, raters: int, adversarial: int, noise: float,
                 tie_threshold: float = 0.0, raters_per_prompt: int = 3) -> None:
        pool = make_pool(raters, adversarial_fraction=adversarial / max(1, raters), noise=noise,
                         tie_threshold=tie_threshold)
        tokens = preference_tokens(cluster)
        try:
            clients = [(rater, RaterClient(cluster.services["preference"].target, tokens.issue(rater.rater_id)))
                       for rater in pool]
        finally:
            tokens.close()
        self.runner = LeasingRaterRunner(clients, raters_per_prompt=raters_per_prompt)
        self._clients = [c for _, c in clients]
        self._thread = threading.Thread(target=self._run, name="simulated-raters", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced through rated_prompts()
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"simulated raters failed: {self.error!r}") from self.error

    def rated_prompts(self) -> int:
        self._check()
        return self.runner.prompts_rated

    def rankings_submitted(self) -> int:
        return self.runner.submitted

    def stop(self) -> None:
        self.runner.stop()
        self._thread.join(timeout=30)
        for client in self._clients:
            client.close()
