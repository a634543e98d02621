"""The generation engine with the real SmolLM2-135M-Instruct weights, plus fast unit tests.

Logprob convention under test (docs/policy.md): token_logprobs[t] = log_softmax(logits_t / T)[token_t]
in float32, before top-k/top-p filtering (T = 1 for greedy). Tolerance: 2e-3 absolute, which
covers the float32 difference between the batched, left-padded, KV-cached decode and one plain
unpadded forward pass over prompt + response (observed ~1e-5); a wrong convention (no
temperature, or renormalised after filtering) is off by > 0.05 on these prompts.
"""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.policy.decode import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, DecodeBatch, Generation, generate_batch
from flywheel.policy.engine import PolicyEngine, load_policy
from flywheel.policy.kv_cache import prepack_available
from flywheel.policy.sampler import choose_tokens, filter_top_k_top_p, sample_filtered, uniforms
from flywheel.policy.sampling import SamplingConfig, SamplingDefaults, resolve
from flywheel.runtime.errors import InvalidArgument
from flywheel.v1 import common_pb2

LOGPROB_TOLERANCE = 2e-3
PROMPTS = ["Say hello to a friend.", "What is the capital of France?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def engine():
    # One intra-op thread: on a shared 2-core machine two spinning OpenMP threads are many times
    # slower than one. Restored afterwards (the setting is process-wide).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PolicyEngine.from_checkpoint()
    torch.set_num_threads(threads)


@torch.inference_mode()
def recomputed_logprobs(engine: PolicyEngine, prompt_ids: list[int], response_ids: list[int],
                        temperature: float) -> list[float]:
    model = engine.current.model
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / t, dim=-1)
    start = len(prompt_ids) - 1
    return [float(logp[start + i, tok]) for i, tok in enumerate(response_ids)]


# -- real weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=0.7, max_new_tokens=12, seed=11, n=2),
    SamplingConfig(temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=12, seed=12, n=2),
    SamplingConfig(temperature=0.0, max_new_tokens=12),
])
def test_logprobs_equal_recomputed_log_softmax(engine: PolicyEngine, sampling: SamplingConfig) -> None:
    grouped = engine.generate(PROMPTS, sampling)  # one batch of different prompt lengths (left padding)
    checked = 0
    for group in grouped:
        for seq in group:
            assert len(seq.logprobs) == len(seq.token_ids) > 0
            expected = recomputed_logprobs(engine, seq.prompt_ids, seq.token_ids, sampling.temperature)
            for got, want in zip(seq.logprobs, expected):
                assert abs(got - want) <= LOGPROB_TOLERANCE, (got, want)
            checked += len(expected)
    assert checked >= len(PROMPTS) * sampling.n


def test_logprobs_are_not_renormalised_after_filtering(engine: PolicyEngine) -> None:
    """With top-k the reported logprob is the unfiltered one: strictly below the renormalised one."""
    [[seq]] = engine.generate([PROMPTS[2]], SamplingConfig(temperature=1.0, top_k=3, max_new_tokens=8, seed=3))
    expected = recomputed_logprobs(engine, seq.prompt_ids, seq.token_ids, 1.0)
    assert seq.logprobs == pytest.approx(expected, abs=LOGPROB_TOLERANCE)
    model = engine.current.model
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq.prompt_ids])).logits[0, -1].float()
    top3 = torch.log_softmax(logits.topk(3).values, dim=-1)
    renormalised = float(top3[(logits.topk(3).indices == seq.token_ids[0]).nonzero()[0, 0]])
    assert seq.logprobs[0] < renormalised - 1e-3


def test_seed_makes_sampling_reproducible(engine: PolicyEngine) -> None:
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=1234, n=2)
    first = engine.generate([PROMPTS[0]], cfg)[0]
    # the same request again, this time batched together with another prompt
    second = engine.generate([PROMPTS[1], PROMPTS[0]], cfg)[1]
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    other = engine.generate([PROMPTS[0]], SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12,
                                                        seed=99, n=2))[0]
    assert [s.token_ids for s in other] != [s.token_ids for s in first]


def test_top_k_1_equals_greedy(engine: PolicyEngine) -> None:
    greedy = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=10))
    top1 = engine.generate(PROMPTS, SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=10, seed=7))
    for g, t in zip(greedy, top1):
        assert g[0].token_ids == t[0].token_ids
        assert g[0].text == t[0].text


def test_n_candidates_differ_and_carry_version(engine: PolicyEngine) -> None:
    [group] = engine.generate([PROMPTS[2]], SamplingConfig(temperature=1.0, max_new_tokens=10, seed=5, n=4))
    assert len(group) == 4
    assert len({tuple(s.token_ids) for s in group}) == 4
    assert {s.policy_version for s in group} == {"policy-0000"}
    assert all(s.finish_reason in (FINISH_LENGTH, FINISH_EOS) for s in group)


def test_stop_sequence_and_eos(engine: PolicyEngine) -> None:
    prompt = "Name three colours."
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=16)
    [[full]] = engine.generate([prompt], greedy)
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop_word = words[2]  # a string greedy decoding is known to produce, past the first token
    stop = SamplingConfig(temperature=0.0, max_new_tokens=16, stop=("unlikely-stop-string", stop_word))
    [[cut]] = engine.generate([prompt], stop)
    assert cut.finish_reason == FINISH_STOP
    assert cut.text == full.text[:full.text.index(stop_word)]
    assert stop_word not in cut.text
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]  # tokens kept up to the one completing the stop
    assert len(cut.logprobs) == len(cut.token_ids)
    # greedy answers end with <|im_end|> well within 64 tokens: eos is reported and kept in the ids
    [[ended]] = engine.generate(["Reply with just the word yes."], SamplingConfig(temperature=0.0, max_new_tokens=64))
    assert ended.finish_reason == FINISH_EOS
    assert ended.token_ids[-1] in engine.current.eos_token_ids
    assert "<|im_end|>" not in ended.text


def test_cancelled_rows_leave_the_batch(engine: PolicyEngine) -> None:
    policy = engine.current
    ids = policy.encode(policy.template(PROMPTS[0]))
    keep = Generation(prompt_text="", temperature=0.0, max_new_tokens=6, prompt_ids=list(ids))
    drop = Generation(prompt_text="", temperature=0.0, max_new_tokens=6, prompt_ids=list(ids))
    steps: list[int] = []

    def on_step(events):  # cancel the second row after the first token
        steps.append(len(events))
        drop.cancelled = True

    generate_batch(policy, [keep, drop], on_step)
    assert keep.finish_reason == FINISH_LENGTH and len(keep.token_ids) == 6
    assert drop.finish_reason == "cancelled" and len(drop.token_ids) == 1
    assert steps[0] == 2 and steps[1:] == [1] * 5


def test_rows_joining_a_running_batch_match_running_alone(engine: PolicyEngine) -> None:
    """Continuous batching: a row merged into a running batch (KV caches left-padded to a common
    width, stale padding trimmed when rows leave) decodes exactly as it would alone."""
    policy = engine.current
    greedy = dict(temperature=0.0, max_new_tokens=10)

    def seq(text: str, **kw) -> Generation:
        return Generation(prompt_text=policy.template(text), **{**greedy, **kw})

    alone = {text: seq(text) for text in PROMPTS}
    for s in alone.values():
        generate_batch(policy, [s])
    batch = DecodeBatch(policy)
    first = seq(PROMPTS[0], max_new_tokens=3)  # leaves early: its columns get trimmed
    second = seq(PROMPTS[1])
    batch.add([first, second])
    batch.step()
    batch.step()
    late = seq(PROMPTS[2])  # a longer prompt joins two steps in
    batch.add([late])
    while batch:
        batch.step()
    assert first.token_ids == alone[PROMPTS[0]].token_ids[:3]
    assert second.token_ids == alone[PROMPTS[1]].token_ids
    assert late.token_ids == alone[PROMPTS[2]].token_ids
    assert late.logprobs == pytest.approx(alone[PROMPTS[2]].logprobs, abs=LOGPROB_TOLERANCE)


# -- fast unit tests (no weights) ---------------------------------------------------------------------
def test_filter_top_k_then_top_p() -> None:
    logp = torch.log_softmax(torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3), dim=-1)
    out = filter_top_k_top_p(logp, torch.tensor([0, 2, 4]), torch.tensor([1.0, 1.0, 0.7]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True] * 5
    assert kept[1].tolist() == [True, True, False, False, False]
    # top-4 renormalised: probs ~ [0.644, 0.237, 0.087, 0.032] -> 0.644 < 0.7, so two tokens stay
    assert kept[2].tolist() == [True, True, False, False, False]
    assert torch.equal(out[kept], logp[kept])  # kept values are not renormalised


@pytest.mark.parametrize("spread", [1.0, 12.0])  # flat: the window fallback; peaked: the fast path
def test_windowed_sampler_draws_only_from_the_reference_kept_set(spread: float) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 64, 5000
    logp = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * spread, dim=-1)
    top_k = torch.tensor([0, 1, 5, 0, 40, 3000, 0, 2000] * 8)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 1.0, 0.8, 0.3, 0.999] * 8)
    reference = torch.isfinite(filter_top_k_top_p(logp, top_k, top_p))
    for trial in range(20):
        u = torch.rand(rows, generator=gen)
        tokens = sample_filtered(logp, top_k, top_p, u, window=256)
        assert bool(reference[torch.arange(rows), tokens].all()), trial
        # the window only decides how much is sorted, never the draw: the default (smallest) window, with its
        # wider retries, and one full sort pick the same tokens for the same uniforms
        assert torch.equal(sample_filtered(logp, top_k, top_p, u), tokens), trial
        assert torch.equal(sample_filtered(logp, top_k, top_p, u, window=vocab), tokens), trial
    # top_k=1 rows always take the argmax
    assert bool((tokens[1::8] == logp[1::8].argmax(-1)).all())
    # the draw follows the filtered distribution: frequencies of a 2-token nucleus
    two = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    drawn = sample_filtered(two, torch.zeros(4000, dtype=torch.long), torch.full((4000,), 0.8),
                             torch.rand(4000, generator=gen))
    assert set(drawn.tolist()) == {0, 1}
    assert abs(float((drawn == 0).float().mean()) - 2 / 3) < 0.03  # 0.6 / (0.6 + 0.3), 4000 draws


def test_choose_tokens_greedy_rows_and_logprob_convention() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.1, 2.0]])
    u = torch.tensor([0.3, 0.8])
    tokens, lps = choose_tokens(logits, torch.tensor([0.0, 0.5]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), u)
    assert tokens[0] == 1
    assert lps[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))
    assert lps[1] == pytest.approx(float(torch.log_softmax(logits[1] / 0.5, -1)[tokens[1]]))


def test_choose_tokens_draws_a_row_the_same_whatever_shares_its_batch() -> None:
    """Greedy, plain and top-k/top-p rows in one batch pick what each kind picks on its own (a batch of one
    kind skips the per-kind row selection)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 3000, generator=gen) * 4
    temperature = torch.tensor([0.0, 0.7, 1.0, 0.9] * 3)
    top_k = torch.tensor([0, 0, 50, 0] * 3)
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9] * 3)
    u = torch.rand(12, generator=gen)
    tokens, lps = choose_tokens(logits, temperature, top_k, top_p, u)
    for kind in range(4):
        rows = torch.arange(kind, 12, 4)
        alone, alone_lps = choose_tokens(logits[rows], temperature[rows], top_k[rows], top_p[rows], u[rows])
        assert torch.equal(tokens[rows], alone), kind
        assert torch.equal(lps[rows], alone_lps), kind
    assert torch.equal(tokens[0::4], logits[0::4].argmax(-1))


def test_sampling_resolution_and_validation() -> None:
    d = SamplingDefaults(temperature=0.9, max_new_tokens=32)
    assert resolve(None, d) == SamplingConfig(temperature=0.9, max_new_tokens=32)
    explicit = resolve(common_pb2.SamplingParams(top_p=0, max_new_tokens=0, n=2, seed=7), d)
    assert (explicit.temperature, explicit.top_p, explicit.max_new_tokens, explicit.seed) == (0.0, 1.0, 32, 7)
    assert explicit.candidate_seed(1) == 8
    assert resolve(common_pb2.SamplingParams(temperature=1.0), d).n == 1
    assert resolve(common_pb2.SamplingParams(n=0), d).n == 1  # common.proto: "0 means 1"
    bad = [
        (common_pb2.SamplingParams(temperature=-0.1, n=1), "temperature"),
        (common_pb2.SamplingParams(temperature=float("nan"), n=1), "temperature"),
        (common_pb2.SamplingParams(top_p=1.5, n=1), "top_p"),
        (common_pb2.SamplingParams(top_k=-1, n=1), "top_k"),
        (common_pb2.SamplingParams(n=-1), "n"),
        (common_pb2.SamplingParams(n=1000), "n"),
        (common_pb2.SamplingParams(n=1, max_new_tokens=10**6), "max_new_tokens"),
        (common_pb2.SamplingParams(n=1, stop=[""]), "stop"),
    ]
    for params, field in bad:
        with pytest.raises(InvalidArgument) as info:
            resolve(params, d)
        assert info.value.field == f"sampling.{field}"
    assert math.isfinite(resolve(common_pb2.SamplingParams(n=1), d).temperature)


# -- the preallocated KV cache and the tensor-only step ------------------------------------------------
@pytest.mark.parametrize("prepack", [True, False], ids=["onednn-prepacked", "f-linear"])
def test_slot_cache_decode_matches_a_plain_forward_pass(engine: PolicyEngine, prepack: bool) -> None:
    """Every row's next-token logits from the slot KV cache equal one unpadded forward pass over its
    prompt + tokens so far, also after a finished row's slot was refilled by the last row; with the
    projections on oneDNN prepacked weights (the CPU default) and on plain F.linear."""
    if prepack:
        if not prepack_available(torch.device("cpu"), torch.float32):
            pytest.skip("this torch build has no oneDNN prepacked linear")
        policy = engine.current
    else:
        policy = load_policy(engine.current.path, "unpacked", validate=False, prepack=False)
    assert policy.decoder().prepacked is prepack
    rows = [Generation(prompt_text=policy.template(text), temperature=0.0, max_new_tokens=budget)
            for text, budget in zip(PROMPTS, (2, 6, 6))]
    batch = DecodeBatch(policy)
    batch.add(rows)
    checked = 0
    while batch:
        batch.step()
        for slot, row in enumerate(batch.rows):
            tokens = batch.out_tokens[slot, :int(batch.counters[slot])].tolist()
            with torch.inference_mode():
                want = policy.model(input_ids=torch.tensor([row.prompt_ids + tokens])).logits[0, -1].float()
            assert torch.allclose(batch.logits[slot], want, atol=2e-3), slot
            checked += 1
    assert rows[0].finish_reason == FINISH_LENGTH and len(rows[0].token_ids) == 2
    assert checked >= 9


def test_prefill_chunks_bound_the_attention_scores() -> None:
    from flywheel.policy.decode import PREFILL_SCORES_BYTES, _prefill_chunks

    assert _prefill_chunks([5, 7, 3], 24, 9) == [(0, 3)]  # small prompts: one forward
    long = [2000, 10, 2000, 2000, 5]
    chunks = _prefill_chunks(long, 0, 9)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(long)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # consecutive, nothing skipped
    for lo, hi in chunks:
        widest = max(long[lo:hi])
        assert hi - lo == 1 or (hi - lo) * 9 * widest * widest * 4 <= PREFILL_SCORES_BYTES
    assert len(chunks) >= 3


def test_a_prefill_split_into_chunks_decodes_like_one(engine: PolicyEngine, monkeypatch) -> None:
    """Rows prefilled in several chunks (long prompts) get the same tokens and logprobs as in one."""
    import flywheel.policy.decode as decode

    policy = engine.current

    def rows() -> list[Generation]:
        return [Generation(prompt_text=policy.template(t), temperature=0.0, max_new_tokens=6) for t in PROMPTS]

    whole = rows()
    generate_batch(policy, whole)
    monkeypatch.setattr(decode, "PREFILL_SCORES_BYTES", 1)  # every row its own chunk
    assert len(decode._prefill_chunks([10, 12, 9], 24, policy.decoder().heads)) == 3
    split = rows()
    generate_batch(policy, split)
    assert [g.token_ids for g in split] == [g.token_ids for g in whole]
    assert [g.logprobs for g in split] == [pytest.approx(g.logprobs, abs=LOGPROB_TOLERANCE) for g in whole]


def test_mixed_sampling_parameters_in_one_batch_match_each_row_alone(engine: PolicyEngine) -> None:
    """Per-row temperature / top-k / top-p / seed: each row of a mixed batch decodes as it would alone."""
    policy = engine.current
    params = [dict(temperature=0.0), dict(temperature=1.5, top_k=1, seed=3), dict(temperature=0.9, seed=4),
              dict(temperature=1.2, top_p=0.8, seed=5), dict(temperature=0.7, top_k=30, top_p=0.9, seed=6)]

    def row(i: int) -> Generation:
        return Generation(prompt_text=policy.template(PROMPTS[i % 3]), max_new_tokens=8, **params[i])

    alone = [row(i) for i in range(len(params))]
    for g in alone:
        generate_batch(policy, [g])
    together = [row(i) for i in range(len(params))]
    generate_batch(policy, together)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.logprobs for g in together] == [pytest.approx(g.logprobs, abs=LOGPROB_TOLERANCE) for g in alone]


def test_counter_based_uniforms() -> None:
    seeds = torch.tensor([0, 1, -5, (1 << 63) - 1])
    first = uniforms(seeds, torch.zeros(4, dtype=torch.long))
    assert torch.equal(first, uniforms(seeds, torch.zeros(4, dtype=torch.long)))  # a pure function
    assert len(set(first.tolist())) == 4  # different seeds, different draws
    draws = uniforms(torch.full((20000,), 42), torch.arange(20000))
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    assert abs(float(draws.mean()) - 0.5) < 0.01 and abs(float(draws.var()) - 1 / 12) < 0.003
    counts = torch.histc(draws, bins=10, min=0.0, max=1.0)
    assert float(counts.min()) > 1800  # 2000 expected per decile


def test_precision_resolution() -> None:
    from flywheel.policy.loading import cpu_has_bf16, resolve_dtype

    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_bf16() else "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_a_forced_bfloat16_policy_decodes_on_any_cpu(engine: PolicyEngine) -> None:
    """policy_dtype=bfloat16 forced on a CPU whose oneDNN cannot prepack bf16 weights (AVX2 only: the reorder
    raises there) falls back to F.linear instead of failing at load; either way its decode step agrees
    with the bf16 model's own forward pass."""
    policy = load_policy(engine.current.path, "bf16", dtype="bfloat16", validate=False)
    assert policy.model.dtype == torch.bfloat16
    assert policy.decoder().prepacked is prepack_available(torch.device("cpu"), torch.bfloat16)
    row = Generation(prompt_text=policy.template(PROMPTS[0]), temperature=0.0, max_new_tokens=4)
    batch = DecodeBatch(policy)
    batch.add([row])
    while batch:
        tokens = batch.out_tokens[0, :int(batch.counters[0])].tolist()
        with torch.inference_mode():
            want = policy.model(input_ids=torch.tensor([row.prompt_ids + tokens])).logits[0, -1].float()
        got = batch.logits[0]
        assert (got - want).abs().max() < 0.05 * want.abs().max(), len(tokens)  # bf16 rounding, not a wrong layer
        batch.step()
    assert len(row.token_ids) == 4 and all(math.isfinite(lp) and lp <= 0 for lp in row.logprobs)
