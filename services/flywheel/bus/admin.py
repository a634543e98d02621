"""Topic creation: every topic of the loop plus its dead-letter topic."""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from kafka.admin import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from flywheel.bus.topics import ALL_TOPICS, Topic

log = logging.getLogger(__name__)


def ensure_topics(bootstrap_servers: Sequence[str] | str, topics: Iterable[Topic] = ALL_TOPICS, *,
                  partitions: int = 3, replication_factor: int = 1, with_dlq: bool = True,
                  client_id: str = "flywheel-admin", **kafka_config: object) -> list[str]:
    """Create missing topics (idempotent). Returns the names that were created.

    `kafka_config` is the security configuration (ServiceSettings.kafka_client_config()): the admin
    client connects exactly as the service's producers and consumers do.
    """
    wanted: list[str] = []
    for topic in topics:
        wanted.append(topic.name)
        if with_dlq:
            wanted.append(topic.dlq)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id=client_id, **kafka_config)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        spec = {name: {"num_partitions": partitions, "replication_factor": replication_factor}
                for name in missing}
        try:
            admin.create_topics(spec, wait_for_metadata=True)
        except TopicAlreadyExistsError:
            # Another service created them concurrently; that is the desired state.
            pass
        log.info("created topics %s", ", ".join(missing))
        return missing
    finally:
        admin.close()
