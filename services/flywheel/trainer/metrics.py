"""Prometheus metrics of the trainer (all prefixed flywheel_trainer_)."""

from prometheus_client import Counter, Gauge, Histogram

STEP = Gauge("flywheel_trainer_step", "PPO steps completed (global step).")
POLICY_VERSION = Gauge("flywheel_trainer_policy_version", "Number of the newest published policy version.")
ROLLOUTS = Counter(
    "flywheel_trainer_rollouts_total",
    "Scored rollouts seen, by outcome: trained, eval (skipped), stale (dropped, beyond max version lag), "
    "duplicate, invalid, empty.", ("outcome",))
VERSION_LAG = Histogram(
    "flywheel_trainer_rollout_version_lag", "Policy-version lag of trained rollouts (trainer version - rollout "
    "version).", buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32))
BUFFERED = Gauge("flywheel_trainer_buffered_rollouts", "Rollouts buffered towards the next PPO step.")
PAUSED = Gauge("flywheel_trainer_paused", "1 while training is paused.")
STEP_SECONDS = Histogram("flywheel_trainer_step_seconds", "Wall time of one PPO update (no checkpointing).",
                         buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
CHECKPOINT_SECONDS = Histogram("flywheel_trainer_checkpoint_seconds", "Time to write one checkpoint durably.",
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
STEP_FAILURES = Counter("flywheel_trainer_step_failures_total",
                        "PPO steps that failed; the trainer reloads its last checkpoint and retries.")
REWARD_JOBS = Counter("flywheel_trainer_reward_model_jobs_total", "Reward-model training jobs, by final state.",
                      ("state",))

# One gauge per PPO statistic of the latest step (StepStats fields).
_STAT_HELP = {
    "mean_score": "Mean reward-model score of the batch.",
    "mean_reward": "Mean total reward (score + KL penalty) per sequence.",
    "kl": "Mean KL(behaviour || reference) per sequence (k1, nats).",
    "kl_estimator_value": "Mean per-sequence KL with the configured estimator.",
    "kl_coef": "KL coefficient used in the step.",
    "policy_loss": "Clipped surrogate loss (mean over minibatches).",
    "value_loss": "Clipped value loss (mean over minibatches).",
    "entropy": "Mean per-token policy entropy.",
    "clipfrac": "Fraction of tokens where the ratio clip was active.",
    "vf_clipfrac": "Fraction of tokens where the value clip was active.",
    "approx_kl": "Approximate KL between the updated and the behaviour policy.",
    "ratio": "Mean probability ratio.",
    "advantage_mean": "Mean advantage after whitening (about 0 when whitening is on).",
    "return_mean": "Mean return.",
    "value_mean": "Mean value estimate.",
    "grad_norm": "Mean gradient norm before clipping.",
    "behaviour_logprob_gap": "Mean |log pi_current - log pi_behaviour| at step start.",
    "mean_response_length": "Mean response length (tokens).",
    "eos_fraction": "Fraction of responses that ended with EOS or a stop sequence.",
    "episodes_per_second": "Rollouts trained per second of PPO update.",
    "mismatch_kl": "Per-token KL(sampler || trainer) on rollouts of the current policy version (numerics: "
                   "sampling precision vs training precision).",
    "tis_active": "1 when truncated importance sampling corrected the last step for the sampler mismatch.",
    "tis_weight_mean": "Mean truncated importance weight p_trainer / p_sampler (capped) of the last step.",
}
STATS = {name: Gauge(f"flywheel_trainer_{name}", help_text) for name, help_text in _STAT_HELP.items()}


def observe_step(stats: dict[str, float]) -> None:
    for name, gauge in STATS.items():
        if name in stats:
            gauge.set(stats[name])
    if "step_seconds" in stats:
        STEP_SECONDS.observe(stats["step_seconds"])
