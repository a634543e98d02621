"""Every Kafka topic of the loop, in one place, with the protobuf type it carries.

Names carry a schema major version (`.v1`): an incompatible message change gets a new topic,
so old and new services can run side by side during a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from flywheel.v1 import common_pb2

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class Topic:
    name: str
    message_type: type[Message]
    schema_version: int = 1

    @property
    def dlq(self) -> str:
        """Dead-letter topic: poison messages land here with the error in their headers."""
        return self.name + DLQ_SUFFIX


# prompts to sample: key = prompt_id
PROMPTS = Topic("flywheel.prompts.v1", common_pb2.Prompt)
# policy samples with behaviour logprobs: key = prompt_id
ROLLOUTS = Topic("flywheel.rollouts.v1", common_pb2.Rollout)
# rollouts with their reward: key = prompt_id
SCORED_ROLLOUTS = Topic("flywheel.scored-rollouts.v1", common_pb2.ScoredRollout)
# raw human feedback events (demonstrations, comparisons, rankings): key = prompt_id
PREFERENCES = Topic("flywheel.preferences.v1", common_pb2.PreferenceEvent)
# Bradley–Terry consensus per prompt, for reward-model training: key = prompt_id
AGGREGATED_PREFERENCES = Topic("flywheel.aggregated-preferences.v1", common_pb2.AggregatedPreference)
# new policy / reward-model checkpoints: key = model kind
MODEL_VERSIONS = Topic("flywheel.model-versions.v1", common_pb2.ModelVersion)

ALL_TOPICS: tuple[Topic, ...] = (
    PROMPTS,
    ROLLOUTS,
    SCORED_ROLLOUTS,
    PREFERENCES,
    AGGREGATED_PREFERENCES,
    MODEL_VERSIONS,
)
