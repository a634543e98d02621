"""PPO maths against hand-computed values (GAE, whitening, KL estimators, clipped losses, KL control)."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.trainer.batch import RolloutFilter, collate, version_number
from flywheel.trainer.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValueHead,
    PPOConfig,
    PPOTrainer,
    compute_gae,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from flywheel.v1 import common_pb2

T = torch.tensor


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP synchronisation costs on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gae_hand_computed_gamma1_lambda_half():
    # deltas = [0 + 0.4 - 0.5, 0 + 0.3 - 0.4, 1 + 0 - 0.3] = [-0.1, -0.1, 0.7]
    # A2 = 0.7; A1 = -0.1 + 0.5 * 0.7 = 0.25; A0 = -0.1 + 0.5 * 0.25 = 0.025
    adv, ret = compute_gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx([0.025, 0.25, 0.7])
    assert ret.flatten().tolist() == pytest.approx([0.525, 0.65, 1.0])


def test_gae_hand_computed_discounted():
    # gamma 0.9, lambda 1: deltas = [0.36 - 0.5, 0.27 - 0.4, 0.7] = [-0.14, -0.13, 0.7]
    # A2 = 0.7; A1 = -0.13 + 0.9 * 0.7 = 0.5; A0 = -0.14 + 0.9 * 0.5 = 0.31
    adv, _ = compute_gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3]]), T([[1.0, 1.0, 1.0]]), gamma=0.9, lam=1.0)
    assert adv.flatten().tolist() == pytest.approx([0.31, 0.5, 0.7])


def test_gae_respects_padding():
    # Row of length 2 (last column is padding, its reward/value must not leak in):
    # V = [1, 1], next V = [1, 0]; deltas = [0 + 1 - 1, 2 + 0 - 1] = [0, 1]; A1 = 1, A0 = 0 + 0.5 * 1 = 0.5
    adv, ret = compute_gae(T([[0.0, 2.0, 5.0]]), T([[1.0, 1.0, 9.0]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert adv.flatten().tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert ret.flatten().tolist() == pytest.approx([1.5, 2.0, 0.0])


def test_gae_matches_reference_reverse_loop():
    torch.manual_seed(0)
    b, n, gamma, lam = 5, 11, 0.97, 0.9
    rewards, values = torch.randn(b, n, dtype=torch.float64), torch.randn(b, n, dtype=torch.float64)
    lengths = torch.tensor([11, 7, 1, 4, 10])
    mask = (torch.arange(n)[None] < lengths[:, None]).double()
    adv, _ = compute_gae(rewards, values, mask, gamma, lam)
    for i in range(b):  # the textbook recursion, one sequence at a time
        last, expected = 0.0, [0.0] * n
        for t in reversed(range(int(lengths[i]))):
            next_v = float(values[i, t + 1]) if t + 1 < lengths[i] else 0.0
            delta = float(rewards[i, t]) + gamma * next_v - float(values[i, t])
            last = delta + gamma * lam * last
            expected[t] = last
        assert adv[i].tolist() == pytest.approx(expected, abs=1e-9)


def test_whitening_hand_computed():
    x = T([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = math.sqrt(5 / 3)
    assert masked_whiten(x, torch.ones_like(x)).flatten().tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s],
                                                                          abs=1e-6)
    y = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    # over the mask: mean 2, unbiased var 1 -> [-1, 0, 1]; masked element zeroed
    assert masked_whiten(y, mask).flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert masked_whiten(y, mask, shift_mean=False).flatten().tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_kl_estimators_hand_computed():
    logp, ref = T([math.log(0.5), math.log(0.3)]), T([math.log(0.25), math.log(0.3)])
    # k1 = log(0.5/0.25) = log 2; k3 with r = ref/p = 0.5: (0.5 - 1) - log 0.5 = log 2 - 0.5
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([math.log(2), 0.0])
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx([math.log(2) - 0.5, 0.0])
    # k3 is never negative, k1 can be
    assert float(kl_per_token(T([math.log(0.1)]), T([math.log(0.9)]), "k1")) < 0
    assert float(kl_per_token(T([math.log(0.1)]), T([math.log(0.9)]), "k3")) == pytest.approx(9 - 1 - math.log(9))
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_kl_estimators_are_unbiased():
    # E_{x~p}[k] = KL(p || q) for both estimators.
    p, q = T([0.7, 0.2, 0.1], dtype=torch.float64), T([0.4, 0.4, 0.2], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        assert float((p * kl_per_token(p.log(), q.log(), est)).sum()) == pytest.approx(exact)


def test_token_rewards_score_on_last_token():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 7.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, non_score = token_rewards(T([1.0, -1.0]), kl, mask, kl_coef=0.1)
    assert non_score.flatten().tolist() == pytest.approx([-0.01, -0.02, -0.03, -0.05, -0.05, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.01, -0.02, 0.97, -0.05, -1.05, 0.0])


def test_clipped_surrogate_hand_computed():
    logprobs = torch.log(T([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    adv = T([[1.0, 1.0, -2.0]])
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    loss, stats = policy_loss(logprobs, old, adv, torch.ones(1, 3), cliprange=0.2)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)
    assert float(stats["ratio"]) == pytest.approx((1.5 + 0.5 + 1.1) / 3)


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    logprobs = torch.log(T([[1.5]])).requires_grad_(True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 1), T([[1.0]]), torch.ones(1, 1), cliprange=0.2)
    loss.backward()
    assert float(logprobs.grad) == 0.0  # ratio beyond 1 + eps with A > 0: no incentive to push further


def test_clipped_value_loss_hand_computed():
    values, old, returns = T([[1.0, 0.0]]), T([[0.5, 0.5]]), T([[2.0, 0.0]])
    # clipped V = [0.7, 0.3]; unclipped sq err = [1, 0]; clipped = [1.69, 0.09]; max = [1.69, 0.09]
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert float(stats["vf_clipfrac"]) == pytest.approx(1.0)


def test_weighted_masked_mean_downweights_rows():
    x = T([[1.0, 3.0], [10.0, 10.0]])
    mask = torch.ones(2, 2)
    assert float(masked_mean(x, mask)) == pytest.approx(6.0)
    # weights are absolute (docs/trainer.md): the denominator stays the number of tokens
    weight = T([[1.0, 1.0], [0.0, 0.0]])
    assert float(masked_mean(x, mask, weight)) == pytest.approx((1 + 3) / 4)
    weight = T([[1.0, 1.0], [0.5, 0.5]])
    assert float(masked_mean(x, mask, weight)) == pytest.approx((1 + 3 + 5 + 5) / 4)


def test_minibatch_of_only_stale_rows_is_down_weighted():
    """A minibatch made only of lag-1 rollouts (weight 0.5) moves the policy half as much; with
    relative weights it moved it as much as fresh rollouts did."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    args = (logprobs.detach(), torch.tensor([[1.0, -0.5], [0.3, 2.0]]), torch.ones(2, 2), 0.2)
    fresh, _ = policy_loss(logprobs, *args)
    stale, _ = policy_loss(logprobs, *args, weight=torch.full((2, 2), 0.5))
    assert float(stale.detach()) == pytest.approx(0.5 * float(fresh.detach()))


def test_masked_var_keeps_precision_far_from_zero():
    """float32 sums of x and x^2 lose the variance when |mean| / std ~ 1000 (relative error ~0.2)."""
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + torch.randn(64, 256, generator=g, dtype=torch.float64)).float()
    mask = torch.ones_like(x)
    mask[:, 200:] = 0
    want = x[:, :200].double().var()
    mean, var = masked_var(x, mask)
    assert float(var) == pytest.approx(float(want), rel=1e-4)
    assert float(mean) == pytest.approx(float(x[:, :200].double().mean()), rel=1e-6)


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 9: error clip(9/6 - 1) = +0.2 -> x (1 + 0.2 * 100 / 10000) = 1.002
    assert ctl.update(9.0, 100) == pytest.approx(0.2 * 1.002)
    # KL 3: error -0.5 clipped to -0.2 -> x 0.998
    assert ctl.update(3.0, 100) == pytest.approx(0.2 * 1.002 * 0.998)
    # KL 6.6: error 0.1 (inside the clip) -> x (1 + 0.1 * 1000 / 10000) = 1.01
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert ctl.update(6.6, 1000) == pytest.approx(0.1 * 1.01)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05


def test_config_validation():
    with pytest.raises(ValueError, match="cliprange"):
        PPOConfig(cliprange=0)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k9")  # type: ignore[arg-type]
    cfg = PPOConfig(adaptive_kl=True, adam_betas=(0.8, 0.9))
    assert PPOConfig.from_dict(cfg.to_dict()) == cfg


# -- the trainer on a tiny GPT-2 -------------------------------------------------------------------


def _tiny():
    from flywheel.trainer.testing import tiny_gpt2

    lm = tiny_gpt2(seed=0)
    ref = tiny_gpt2(seed=0)
    return lm, ref


def _rollouts(lm, n=4, plen=5, rlen=6, logprob_shift=0.0, finished=True, version="policy-0000"):
    """Rollouts whose behaviour log-probs are the model's own (+ shift), as a policy service reports them."""
    from flywheel.trainer.ppo import response_forward

    lm.eval()
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        p = torch.randint(0, 1000, (plen,), generator=g).tolist()
        r = torch.randint(0, 1000, (rlen,), generator=g).tolist()
        ids = torch.tensor([p + r])
        with torch.no_grad():
            lp, _, _ = response_forward(lm, ids, torch.ones_like(ids), torch.tensor([plen]), torch.tensor([r]),
                                        torch.ones(1))
        ro = common_pb2.Rollout(rollout_id=f"r{i}", prompt_token_ids=p, response_token_ids=r,
                                token_logprobs=(lp[0] + logprob_shift).tolist(), policy_version=version,
                                finish_reason=common_pb2.FINISH_REASON_EOS_TOKEN if finished
                                else common_pb2.FINISH_REASON_LENGTH)
        out.append(common_pb2.ScoredRollout(rollout=ro, reward=float(i % 2)))
    return out


def test_ratio_uses_behaviour_logprobs():
    lm, ref = _tiny()
    # Behaviour policy assigned half the probability the current policy does: ratio = 2 everywhere.
    batch = collate(_rollouts(lm, logprob_shift=-math.log(2)))
    trainer = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, sampler_correction="none"),
                         PolicyWithValueHead(lm), ref)
    stats = trainer.step(batch)
    assert stats.ratio == pytest.approx(2.0, rel=1e-3)
    assert stats.clipfrac > 0
    assert stats.behaviour_logprob_gap == pytest.approx(math.log(2), rel=1e-3)
    # Recompute mode ignores the behaviour log-probs: ratio 1 on the first (only) minibatch.
    lm2, ref2 = _tiny()
    trainer = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, ratio_logprobs="recompute"),
                         PolicyWithValueHead(lm2), ref2)
    assert trainer.step(collate(_rollouts(lm2, logprob_shift=-math.log(2)))).ratio == pytest.approx(1.0, abs=1e-4)


def test_step_kl_zero_against_identical_reference_and_missing_eos_penalty():
    lm, ref = _tiny()
    cfg = PPOConfig(ppo_epochs=1, mini_batch_size=2, kl_coef=0.0, missing_eos_penalty=1.0)
    trainer = PPOTrainer(cfg, PolicyWithValueHead(lm), ref)
    stats = trainer.step(collate(_rollouts(lm, finished=False)))
    assert stats.kl == pytest.approx(0.0, abs=1e-4)  # behaviour == policy == reference at step start
    assert stats.mean_score == pytest.approx(0.5)  # raw scores 0, 1, 0, 1
    assert stats.mean_reward == pytest.approx(0.5 - 1.0, abs=1e-4)  # every response truncated: -1 each
    assert stats.eos_fraction == 0.0
    assert trainer.global_step == 1


def test_step_changes_policy_and_adaptive_kl_moves():
    lm, ref = _tiny()
    before = [p.detach().clone() for p in lm.parameters()]
    cfg = PPOConfig(ppo_epochs=2, mini_batch_size=2, adaptive_kl=True, kl_coef=0.2, target_kl=6.0,
                    kl_horizon=100, learning_rate=1e-3)
    trainer = PPOTrainer(cfg, PolicyWithValueHead(lm), ref)
    trainer.step(collate(_rollouts(lm)))
    # KL(behaviour || ref) was 0 < target: error -0.2, x (1 - 0.2 * 4 / 100)
    assert trainer.kl_ctl.value == pytest.approx(0.2 * (1 - 0.2 * 4 / 100))
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))  # the reference stays frozen


def test_rollout_filter_staleness_dedup_and_state():
    f = RolloutFilter(max_version_lag=2, weight_decay=0.5)
    r = _rollouts(_tiny()[0], n=1, version="policy-0003")[0]
    assert version_number("policy-0003") == 3
    ok = f.admit(r, current_version=4)
    assert ok.accepted and ok.lag == 1 and ok.weight == 0.5
    assert f.admit(r, current_version=6).reason == "stale"
    f.mark_trained([r])
    assert f.admit(r, current_version=4).reason == "duplicate"
    restored = RolloutFilter(2)
    restored.load_state_dict(f.state_dict())
    assert restored.admit(r, current_version=4).reason == "duplicate"
    restored.prune(current_version=6)  # policy-0003 is beyond the window now
    assert restored.trained_count() == 0
    r.rollout.split = "eval"
    assert f.admit(r, current_version=4).reason == "eval"


def test_ppo_learns_a_simple_reward():
    """Closed loop on a tiny GPT-2: sample, score (fraction of 'good' tokens), PPO step. The reward rises.

    Each iteration's mean is over 96 tokens (std ~0.031 at p = 0.1), a 3-iteration mean ~0.018, so
    without learning a rise of 0.06 is a 2.4-sigma event (~1%); observed here: about +0.11 (seeded)."""
    from flywheel.trainer.ppo import response_forward

    torch.manual_seed(0)
    lm, ref = _tiny()
    lm.eval()
    trainer = PPOTrainer(PPOConfig(ppo_epochs=4, mini_batch_size=8, learning_rate=3e-3, kl_coef=0.01),
                         PolicyWithValueHead(lm), ref)
    good = torch.zeros(1000, dtype=torch.bool)
    good[:100] = True  # 10% of the vocabulary
    means = []
    g = torch.Generator().manual_seed(0)
    for it in range(14):
        prompts = torch.randint(100, 1000, (16, 4), generator=g)
        with torch.inference_mode():
            out = lm.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=6,
                              top_k=0, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        resp = out.sequences[:, 4:]
        logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, resp[..., None]).squeeze(-1)
        scores = good[resp].float().mean(1)
        means.append(float(scores.mean()))
        rollouts = [common_pb2.ScoredRollout(rollout=common_pb2.Rollout(
            rollout_id=f"{it}-{i}", prompt_token_ids=prompts[i].tolist(), response_token_ids=resp[i].tolist(),
            token_logprobs=logp[i].tolist(), policy_version="policy-0000"), reward=float(scores[i]))
            for i in range(16)]
        trainer.step(collate(rollouts))
    assert sum(means[:3]) / 3 < 0.2
    assert sum(means[-3:]) / 3 > sum(means[:3]) / 3 + 0.06, means


def test_recompute_ratio_leaves_the_kl_penalty_on_behaviour_logprobs():
    """ratio_logprobs=recompute changes the ratio only; the KL penalty follows kl_logprobs."""
    lm, ref = _tiny()
    rollouts = _rollouts(lm, logprob_shift=-math.log(2))  # behaviour = policy (= reference) - log 2
    cfg = PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, ratio_logprobs="recompute",
                    sampler_correction="none")
    stats = PPOTrainer(cfg, PolicyWithValueHead(lm), ref).step(collate(rollouts))
    assert stats.ratio == pytest.approx(1.0, abs=1e-4)
    assert stats.kl == pytest.approx(-6 * math.log(2), rel=1e-3)  # 6 tokens of log(behaviour / ref)
    lm2, ref2 = _tiny()
    cfg = PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, ratio_logprobs="recompute",
                    kl_logprobs="recompute", sampler_correction="none")
    assert PPOTrainer(cfg, PolicyWithValueHead(lm2), ref2).step(collate(rollouts)).kl == pytest.approx(0.0, abs=1e-4)


def _bf16_rollouts(lm, **kw):
    """Rollouts whose behaviour log-probs come from a bfloat16 copy of `lm` (a bf16 policy service)."""
    import copy

    sampler = copy.deepcopy(lm).to(torch.bfloat16)
    return _rollouts(sampler, **kw)


def test_sampler_precision_mismatch_is_measured_and_corrected():
    lm, ref = _tiny()
    same = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12), PolicyWithValueHead(lm), ref)
    exact = same.step(collate(_rollouts(lm)), current_version="policy-0000")
    assert exact.mismatch_kl < 1e-7 and exact.tis_active == 0.0 and exact.ratio == pytest.approx(1.0, abs=1e-5)

    mixed = collate(_bf16_rollouts(lm, rlen=12))
    plain = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, sampler_correction="none"),
                       PolicyWithValueHead(lm), ref).step(mixed, current_version="policy-0000")
    # bf16 sampler vs fp32 trainer: visible (this tiny random model is near-uniform, so its KL is small in
    # absolute terms: ~4e-7 against < 1e-10 in fp32; SmolLM2's is 1.6e-3, see docs/policy.md)
    assert plain.mismatch_kl > 1000 * max(exact.mismatch_kl, 1e-12), (plain.mismatch_kl, exact.mismatch_kl)
    assert plain.tis_active == 0.0 and abs(plain.ratio - 1.0) > 1e-5  # the ratio starts off 1 by the numerics
    auto = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, mismatch_kl_threshold=1e-8),
                      PolicyWithValueHead(lm), ref)
    corrected = auto.step(mixed, current_version="policy-0000")
    assert corrected.mismatch_kl == pytest.approx(plain.mismatch_kl, rel=1e-4)
    assert corrected.tis_active == 1.0 and auto.mismatch_detected
    assert corrected.ratio == pytest.approx(1.0, abs=1e-5)  # the ratio is against the trainer's own log-probs
    assert corrected.clipfrac == 0.0 and plain.clipfrac >= 0.0
    assert corrected.tis_weight_mean != 1.0 and 0 < corrected.tis_weight_mean <= 2.0
    # rows of another policy version are not numerics: they are not counted as mismatch
    other = PPOTrainer(PPOConfig(ppo_epochs=1, mini_batch_size=4, learning_rate=1e-12, mismatch_kl_threshold=1e-8),
                       PolicyWithValueHead(lm), ref)
    elsewhere = other.step(mixed, current_version="policy-0001")
    assert elsewhere.mismatch_kl == 0.0 and elsewhere.tis_active == 0.0


def test_truncated_is_weights_are_capped_and_carry_no_gradient():
    from flywheel.trainer.losses import truncated_is_weights

    trainer_lp = torch.tensor([[-1.0, -0.1, -3.0]], requires_grad=True)
    sampler_lp = torch.tensor([[-1.0, -2.0, -2.9]])
    w = truncated_is_weights(trainer_lp, sampler_lp, cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, math.exp(-0.1)])
    assert not w.requires_grad


def test_bf16_autocast_step_matches_fp32_and_keeps_the_kl_penalty_clean():
    """dtype=bfloat16: one step's stats match fp32's; weights and grads stay fp32; the KL
    penalty compares fp32 log-probs (0 while policy == reference), and the fp32 sampler against the
    bf16 trainer is a measured mismatch that TIS corrects."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        lm, ref = _tiny()
        rollouts = collate(_rollouts(lm, rlen=12))  # behaviour log-probs from the fp32 model (an fp32 sampler)
        cfg = PPOConfig(ppo_epochs=1, mini_batch_size=2, learning_rate=1e-3, kl_coef=0.1,
                        kl_estimator="k3", dtype=dtype, mismatch_kl_threshold=1e-8)
        trainer = PPOTrainer(cfg, PolicyWithValueHead(lm), ref)
        results[dtype] = (trainer.step(rollouts, current_version="policy-0000"), trainer, lm)
    (exact, _, lm32), (low, trainer, lm16) = results["float32"], results["bfloat16"]
    assert trainer.compute_dtype == "bfloat16"
    assert all(p.dtype == torch.float32 for p in lm16.parameters())
    assert all(s.dtype == torch.float32 for st in trainer.optimizer.state.values() for s in st.values()
               if torch.is_tensor(s) and s.numel() > 1)
    # the forward passes really ran in bf16: the fp32 sampler now differs from the trainer
    assert low.mismatch_kl > 1000 * max(exact.mismatch_kl, 1e-12) and low.tis_active == 1.0
    assert exact.tis_active == 0.0
    # KL(pi || ref) = 0 at step start in both: the reference runs in fp32, no bf16 noise in the penalty
    assert exact.kl == pytest.approx(0.0, abs=1e-5) and low.kl == pytest.approx(0.0, abs=1e-5)
    assert low.kl_estimator_value == pytest.approx(0.0, abs=1e-5)
    for name in ("mean_reward", "advantage_mean", "return_mean", "value_mean"):
        assert getattr(low, name) == pytest.approx(getattr(exact, name), abs=1e-5), name
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm"):
        assert getattr(low, name) == pytest.approx(getattr(exact, name), rel=0.05, abs=2e-3), name
    assert low.ratio == pytest.approx(1.0, abs=1e-2)
    start = torch.cat([p.detach().flatten() for p in _tiny()[0].parameters()])
    step32, step16 = (torch.cat([p.detach().flatten() for p in m.parameters()]) - start for m in (lm32, lm16))
    cosine = float(torch.nn.functional.cosine_similarity(step32, step16, dim=0))
    assert cosine > 0.9, cosine  # both updates went the same way (Adam's first steps are ~lr * sign(grad))


def test_compute_dtype_setting_reaches_the_config():
    from flywheel.trainer.settings import TrainerSettings

    assert TrainerSettings().ppo_config().dtype == "float32"  # opt-in
    assert TrainerSettings(trainer_dtype="auto").ppo_config().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        PPOConfig(dtype="float16")  # type: ignore[arg-type]


def test_kl_penalty_on_stale_rollouts_uses_the_behaviour_policy_and_an_fp32_reference():
    """Rollouts drawn by the reference and trained on after the policy moved (stale, as in the async
    loop), by a bf16 trainer whose TIS is on: the penalty compares the behaviour log-probs with the fp32
    reference's (KL 0 here), not the trainer's recomputation, whose log pi_now - log pi_ref on tokens
    it did not draw is no KL estimate and goes negative (the adaptive controller would loosen on it)."""
    lm, ref = _tiny()
    rollouts = collate(_rollouts(lm, rlen=12))
    trainer = PPOTrainer(PPOConfig(ppo_epochs=2, mini_batch_size=2, learning_rate=1e-2, dtype="bfloat16",
                                   mismatch_kl_threshold=1e-8), PolicyWithValueHead(lm), ref)
    first = trainer.step(rollouts, current_version="policy-0000")
    assert first.tis_active == 1.0  # fp32 sampler vs bf16 trainer
    stale = trainer.step(rollouts, current_version="policy-0001")
    assert stale.behaviour_logprob_gap > 1e-2, "the policy did not move"
    assert stale.kl == pytest.approx(0.0, abs=1e-5)
