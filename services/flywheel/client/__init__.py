"""Typed clients for Flywheel's services, for apps and scripts (sync and asyncio).

    from flywheel.client import RewardClient
    reward = RewardClient("reward.example:50052", api_key="fwk_...", tls=True)
    print(reward.score("How was your day?", ["Great, thanks!", "Leave me alone."]))

Every client takes `ClientOptions` (or its fields as keywords): the API key (default
$FLYWHEEL_API_KEY), TLS, the per-attempt deadline and retries on UNAVAILABLE / RESOURCE_EXHAUSTED.
"""

from flywheel.client._calls import ClientOptions
from flywheel.client.policy import AsyncPolicyClient, PolicyClient
from flywheel.client.preference import AsyncPreferenceClient, PreferenceClient
from flywheel.client.reward import AsyncRewardClient, Comparison, RewardClient, Score

__all__ = ["AsyncPolicyClient", "AsyncPreferenceClient", "AsyncRewardClient", "ClientOptions", "Comparison",
           "PolicyClient", "PreferenceClient", "RewardClient", "Score"]
