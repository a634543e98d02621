"""Scorers and the dynamic batcher, in process (tiny real-format checkpoints; VADER is real)."""

from __future__ import annotations

import asyncio

import pytest

from flywheel.reward.batching import DynamicBatcher
from flywheel import checkpoints
from flywheel.reward.scorers import (
    EnsembleScorer,
    TransformerRewardScorer,
    VaderScorer,
    build_scorer,
    parse_ensemble,
    plan_chunks,
    with_reward_model,
)
from flywheel.reward.settings import RewardSettings
from flywheel.reward.testing import GatedScorer, tiny_reward_checkpoint
from flywheel.runtime.errors import DeadlineExceeded, Overloaded

PROMPTS = ["How was your day?", "Tell me about the weather.", "What do you think of this film?", "Hi"]
RESPONSES = [
    "It was wonderful, thank you so much!",
    "Terrible storms all week, I hate it.",
    "A boring, mediocre film with a dreadful ending and awful acting throughout the second half.",
    "ok",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_reward_checkpoint(tmp_path_factory.mktemp("tiny") / "reward-0001", version="reward-0001", seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TransformerRewardScorer:
    return TransformerRewardScorer(tiny_dir, max_length=64, max_batch_size=2)


def test_vader_is_deterministic_and_ignores_the_prompt() -> None:
    vader = VaderScorer()
    scores = vader.score(PROMPTS, RESPONSES)
    assert scores == vader.score(["x"] * 4, RESPONSES)
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] < -0.5 and scores[3] > 0
    assert vader.name == "vader" and vader.version.count(".") >= 1


def test_transformer_reads_version_and_uri_from_checkpoint(tiny, tiny_dir) -> None:
    assert tiny.version == "reward-0001"
    assert tiny.name == "transformer"
    assert tiny.checkpoint_uri == str(tiny_dir)
    assert tiny.model_name == "tiny-bert-reward"


def test_transformer_batched_equals_one_at_a_time_including_chunking(tiny) -> None:
    batched = tiny.score(PROMPTS, RESPONSES)  # 4 items, max_batch_size 2: two length-sorted chunks
    single = [tiny.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 4) for s in batched)) == 4  # the scores actually differ per input


def test_length_aware_chunks_match_the_unpadded_scores(tiny_dir) -> None:
    # One long pair among short ones: split so the short ones are not padded to it; every score
    # equals the pair scored alone (no padding at all).
    scorer = TransformerRewardScorer(tiny_dir, max_length=64, max_batch_size=32, forward_overhead_tokens=4)
    prompts = ["Hi"] * 6 + ["Tell me everything about the weather this week, day by day."]
    responses = ["ok", "fine", "good", "bad", "yes", "no",
                 "Monday rain, Tuesday sun, Wednesday storms, Thursday fog, Friday wind and snow."]
    batched = scorer.score(prompts, responses)
    single = [scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)


def test_plan_chunks_minimises_padding_plus_per_pass_overhead() -> None:
    # Equal lengths: as few passes as the batch size allows, covering every item once, in order.
    chunks = plan_chunks([10] * 5, max_batch_size=2, overhead_tokens=8)
    assert len(chunks) == 3 and all(0 < end - start <= 2 for start, end in chunks)
    assert [i for start, end in chunks for i in range(start, end)] == list(range(5))
    # One long item: its own pass (8 + 6*10 + 8 + 100 = 176 < 8 + 7*100 = 708).
    assert plan_chunks([10] * 6 + [100], max_batch_size=32, overhead_tokens=8) == [(0, 6), (6, 7)]
    # A small length difference is not worth a second pass: 32 + 4*12 = 80 < 32 + 2*10 + 32 + 2*12 = 108.
    assert plan_chunks([10, 10, 12, 12], max_batch_size=32, overhead_tokens=32) == [(0, 4)]
    # Without overhead, every distinct length gets its own pass.
    assert plan_chunks([10, 10, 12, 12], max_batch_size=32, overhead_tokens=0) == [(0, 2), (2, 4)]
    assert plan_chunks([], max_batch_size=4, overhead_tokens=8) == []


def test_transformer_uses_the_prompt_and_truncates(tiny) -> None:
    a, b = tiny.score(["Tell me a story.", "What is 2+2?"], ["Sure."] * 2)
    assert a != pytest.approx(b, abs=1e-6)
    long = "word " * 600
    assert len(tiny.score([long], [long])) == 1  # truncated to max_length, no position overflow
    assert tiny.encode([long], [long])["input_ids"].shape[1] == 64


def test_transformer_loads_file_uri(tiny_dir) -> None:
    scorer = TransformerRewardScorer(tiny_dir.as_uri(), max_length=32)
    assert scorer.version == "reward-0001"
    assert checkpoints.resolve(tiny_dir.as_uri(), tiny_dir.parent / "cache") == tiny_dir
    with pytest.raises(FileNotFoundError):
        checkpoints.resolve(tiny_dir.parent / "missing", tiny_dir.parent / "cache")


def test_ensemble_weights_and_components(tiny) -> None:
    vader = VaderScorer()
    ensemble = EnsembleScorer([(tiny, 0.5), (vader, 2.0)])
    result = ensemble.score_components(PROMPTS, RESPONSES)
    t, v = tiny.score(PROMPTS, RESPONSES), vader.score(PROMPTS, RESPONSES)
    assert result.values == pytest.approx([0.5 * a + 2.0 * b for a, b in zip(t, v)], abs=1e-5)
    assert [c.scorer for c in result.components] == ["transformer", "vader"]
    assert result.components[1].values == v
    assert "transformer@reward-0001" in ensemble.version and "vader@" in ensemble.version


def test_with_reward_model_replaces_only_transformers(tiny, tiny_dir) -> None:
    other = TransformerRewardScorer(tiny_dir, version="reward-0002")
    assert with_reward_model(tiny, other) is other
    assert with_reward_model(VaderScorer(), other) is None
    replaced = with_reward_model(EnsembleScorer([(tiny, 1.0), (VaderScorer(), 1.0)]), other)
    assert isinstance(replaced, EnsembleScorer) and replaced.members[0][0] is other


def test_parse_ensemble_and_build_from_settings(tiny_dir) -> None:
    assert parse_ensemble("transformer=0.8, vader=0.2") == [("transformer", 0.8), ("vader", 0.2)]
    assert parse_ensemble("vader") == [("vader", 1.0)]
    with pytest.raises(ValueError, match="weight"):
        parse_ensemble("vader=heavy")
    with pytest.raises(ValueError):
        parse_ensemble(" , ")
    with pytest.raises(ValueError, match="unknown scorer 'bogus'"):  # members resolve at build time (plugins)
        build_scorer(RewardSettings(reward_scorer="ensemble", reward_ensemble="bogus=1"))
    assert isinstance(build_scorer(RewardSettings(reward_scorer="vader")), VaderScorer)
    ensemble = build_scorer(RewardSettings(reward_scorer="ensemble", reward_model_uri=str(tiny_dir),
                                           reward_ensemble="transformer=1,vader=0.5"))
    assert isinstance(ensemble, EnsembleScorer) and ensemble.members[0][0].version == "reward-0001"
    with pytest.raises(ValueError):
        build_scorer(RewardSettings(reward_scorer="nope"))


async def test_concurrent_requests_batch_and_match_unbatched(tiny) -> None:
    batcher = DynamicBatcher(tiny, max_batch_size=8, max_wait_s=0.05, max_queue_items=100)
    batcher.start()
    try:
        pairs = [(PROMPTS[i % 4], RESPONSES[(i * 3) % 4] + f" #{i}") for i in range(24)]
        results = await asyncio.gather(*(batcher.score([p], [r]) for p, r in pairs))
        expected = [tiny.score([p], [r])[0] for p, r in pairs]
        assert [r.values[0] for r in results] == pytest.approx(expected, abs=1e-5)
        assert batcher.batches < len(pairs)  # requests actually shared forward passes
        assert results[0].scorer_version == "reward-0001"
    finally:
        await batcher.stop()


async def test_queue_bound_raises_overloaded_and_deadline_is_honoured() -> None:
    gated = GatedScorer()
    batcher = DynamicBatcher(gated, max_batch_size=2, max_wait_s=0.0, max_queue_items=4)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.score(["p"], ["a"]))  # taken into the (blocked) forward pass
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.score(["p"] * 2, ["bb", "ccc"])) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.queued_items == 4
        with pytest.raises(Overloaded):
            await batcher.score(["p"], ["dddd"])
        batcher.max_queue_items = 5  # room for one more item, which cannot run before its deadline
        with pytest.raises(DeadlineExceeded):
            await batcher.score(["p"], ["late"], timeout_s=0.05)
        gated.gate.set()
        assert (await first).values == [1.0]
        assert [(await q).values for q in queued] == [[2.0, 3.0], [2.0, 3.0]]
        # The timed-out request never reached the scorer.
        assert sorted(gated.calls) == [1, 2, 2]
    finally:
        gated.gate.set()
        await batcher.stop()


async def test_work_for_a_caller_past_its_deadline_stops_between_slices() -> None:
    """A large request whose deadline passes mid-way is not scored to the end (finding 3)."""
    gated = GatedScorer()
    batcher = DynamicBatcher(gated, max_batch_size=2, max_wait_s=0.0)
    batcher.start()
    try:
        with pytest.raises(DeadlineExceeded):
            await batcher.score(["p"] * 10, ["r"] * 10, timeout_s=0.1)
        gated.gate.set()  # the first slice finishes after the caller is gone; the other 8 items never run
        assert (await batcher.score(["p"], ["next"])).values == [4.0]
        assert gated.calls == [2, 1]
        big = await batcher.score(["p"] * 5, ["abc"] * 5)  # a live caller still gets every slice, in order
        assert big.values == [3.0] * 5 and gated.calls[2:] == [2, 2, 1]
    finally:
        gated.gate.set()
        await batcher.stop()


def test_vader_cost_is_bounded_per_item_in_words_emoji_expanded() -> None:
    """20,000 emoji once kept VADER busy 136 s: only the first max_words analysed words count."""
    vader = VaderScorer(max_words=30)
    assert vader.bounded("fine " * 10) == "fine " * 10
    assert vader.bounded("good " * 100).split() == ["good"] * 30
    assert vader.bounded("🙂" * 20_000) == "🙂" * 10  # "slightly smiling face": 3 words each
    assert vader.score(["p"], ["🙂" * 20_000]) == vader.score(["p"], ["🙂" * 10])
    assert VaderScorer().max_words == 512


async def test_swap_applies_to_next_batch_in_flight_finishes_on_old() -> None:
    old, new = GatedScorer("1"), GatedScorer("2")
    new.gate.set()
    batcher = DynamicBatcher(old, max_batch_size=4, max_wait_s=0.0)
    batcher.start()
    try:
        in_flight = asyncio.ensure_future(batcher.score(["p"], ["x"]))
        await asyncio.sleep(0.05)
        batcher.swap(new)
        old.gate.set()
        assert (await in_flight).scorer_version == "1"
        assert (await batcher.score(["p"], ["x"])).scorer_version == "2"
    finally:
        await batcher.stop()


def test_remote_checkpoint_uri_is_copied_once_into_the_cache(tiny_dir, tmp_path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for file in tiny_dir.iterdir():
        fs.pipe(f"/ckpts/reward-0001/{file.name}", file.read_bytes())
    local = checkpoints.resolve("memory://ckpts/reward-0001", tmp_path / "cache")
    assert local.parent == tmp_path / "cache" and (local / "model.safetensors").exists()
    assert checkpoints.resolve("memory://ckpts/reward-0001", tmp_path / "cache") == local  # cached
    scorer = TransformerRewardScorer("memory://ckpts/reward-0001", cache_dir=tmp_path / "cache", max_length=32)
    assert scorer.version == "reward-0001" and scorer.checkpoint_uri == "memory://ckpts/reward-0001"


class SlowScorer(GatedScorer):
    """Each forward pass takes 50 ms (like a model), whatever the batch size."""

    def score(self, prompts, responses):
        import time

        time.sleep(0.05)
        self.calls.append(len(prompts))
        return [float(len(r)) for r in responses]


async def test_closed_loop_client_cohorts_merge_into_full_batches() -> None:
    scorer = SlowScorer()
    batcher = DynamicBatcher(scorer, max_batch_size=16, max_wait_s=0.002, wait_fraction=0.5)
    batcher.start()
    stop = asyncio.Event()

    async def client(k: int) -> int:
        await asyncio.sleep(0.012 * k)  # staggered starts: several cohorts at first
        n = 0
        while not stop.is_set():
            assert (await batcher.score(["p"], ["x" * k])).values == [float(k)]
            n += 1
        return n

    try:
        clients = [asyncio.ensure_future(client(k)) for k in range(16)]
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        await batcher.stop()
    assert scorer.calls[0] < 16  # it did start split up...
    assert scorer.calls[-6:-1] == [16] * 5  # ...and ends with every client in each forward pass


async def test_a_lone_sequential_caller_never_waits_for_a_batch_to_fill() -> None:
    """With a huge max_wait, a caller scoring one request at a time still gets answers at once (the
    wait only pays when other callers can join); concurrent callers still share a pass."""
    scorer = GatedScorer()
    scorer.gate.set()
    batcher = DynamicBatcher(scorer, max_batch_size=4, max_wait_s=60.0)
    batcher.start()
    try:
        for text in ("a", "bb", "ccc"):
            result = await asyncio.wait_for(batcher.score([""], [text]), timeout=20)
            assert result.values == [float(len(text))]
        assert scorer.calls == [1, 1, 1]
        results = await asyncio.wait_for(asyncio.gather(*(batcher.score([""], ["x" * k]) for k in range(1, 5))), 20)
        assert [r.values for r in results] == [[1.0], [2.0], [3.0], [4.0]] and scorer.calls[3:] == [4]
    finally:
        await batcher.stop()


def test_bf16_scores_stay_close_to_fp32_on_real_minilm() -> None:
    """reward_dtype=bfloat16 (autocast) moves the real MiniLM's scores by ~1e-3 and keeps their order."""
    import torch

    bf16 = build_scorer(RewardSettings(reward_dtype="bfloat16", reward_max_length=64))
    fp32 = TransformerRewardScorer(max_length=64)
    assert (bf16.dtype, fp32.dtype) == ("bfloat16", "float32")
    with torch.no_grad():  # a fresh head scores ~0 for everything: give it a spread worth ranking
        head = fp32.model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    bf16.model.load_state_dict(fp32.model.state_dict())
    prompts = [*PROMPTS, "Summarise the plot.", "Explain photosynthesis briefly."]
    responses = [*RESPONSES, "lol idk", "Plants turn light, water and carbon dioxide into sugar and oxygen."]
    exact, low = fp32.score(prompts, responses), bf16.score(prompts, responses)
    assert low != exact  # bf16 really computed
    assert low == pytest.approx(exact, abs=0.02)  # measured: max |diff| ~3e-3 on scores of spread ~0.1-0.5
    clear = [(i, j) for i in range(len(exact)) for j in range(len(exact)) if exact[i] - exact[j] > 0.04]
    assert clear and all(low[i] > low[j] for i, j in clear)  # pairs > 2x the tolerance apart keep their order
