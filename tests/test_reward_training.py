"""Reward-model training: data loading, splits, checkpoints, publishing, CLI, and model quality
with the real MiniLM weights."""

from __future__ import annotations

import json
import time

import pytest

from flywheel.precision import resolve_dtype
from flywheel.reward.datasets import sentiment_pairs
from flywheel.reward.scorers import TransformerRewardScorer
from flywheel.reward.testing import tiny_reward_checkpoint
from flywheel.reward.training import (
    RewardTrainingConfig,
    load_pairs,
    load_pairs_from_topic,
    next_version,
    split_by_prompt,
    train_reward_model,
    write_pairs_jsonl,
)
from flywheel.v1 import common_pb2

ROWS = [
    {"prompt_id": "p1", "prompt_text": "Hi", "chosen_id": "a", "chosen_text": "Hello, lovely to meet you!",
     "rejected_id": "b", "rejected_text": "Go away.", "margin": 1.5},
    {"prompt_id": "p2", "prompt_text": "How is it?", "chosen_id": "c", "chosen_text": "Great!",
     "rejected_id": "d", "rejected_text": "Terrible.", "margin": 0.0},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_reward_checkpoint(tmp_path_factory.mktemp("tiny") / "base", version="reward-0000", seed=5)


def test_load_pairs_from_jsonl_parquet_and_directory(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_pairs_jsonl(ROWS, tmp_path / "export" / "a.jsonl")
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), tmp_path / "export" / "b.parquet")
    from_jsonl = load_pairs(tmp_path / "export" / "a.jsonl")
    assert [p.chosen_text for p in from_jsonl] == ["Hello, lovely to meet you!", "Great!"]
    assert from_jsonl[0].margin == 1.5 and from_jsonl[0].prompt_id == "p1"
    assert len(load_pairs(tmp_path / "export")) == 3
    assert load_pairs((tmp_path / "export" / "a.jsonl").as_uri()) == from_jsonl  # the export's pairs_uri form
    assert len(load_pairs((tmp_path / "export" / "b.parquet").as_uri())) == 1
    import fsspec

    fsspec.filesystem("memory").pipe("/exports/pairs.jsonl", (tmp_path / "export" / "a.jsonl").read_bytes())
    assert load_pairs("memory://exports/pairs.jsonl") == from_jsonl
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt_text": "x", "chosen_text": "y"}) + "\n")
    with pytest.raises(ValueError, match="rejected_text"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "neg.jsonl").write_text(json.dumps({**ROWS[0], "margin": -1}) + "\n")
    with pytest.raises(ValueError, match="margin"):
        load_pairs(tmp_path / "neg.jsonl")
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "missing.jsonl")


def test_split_is_deterministic_and_by_prompt() -> None:
    pairs = [common_pb2.PreferencePair(prompt_id=f"p{i // 3}", chosen_text="a", rejected_text="b")
             for i in range(300)]
    train, held = split_by_prompt(pairs, 0.25, seed=1)
    assert (train, held) == split_by_prompt(pairs, 0.25, seed=1)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in held})
    assert 0.1 < len(held) / len(pairs) < 0.4
    assert split_by_prompt(pairs, 0.25, seed=2)[1] != held


def test_sentiment_dataset_is_deterministic_and_disjoint() -> None:
    train, held = sentiment_pairs(seed=0)
    assert (train, held) == sentiment_pairs(seed=0)
    train_texts = {p.chosen_text for p in train} | {p.rejected_text for p in train}
    held_texts = {p.chosen_text for p in held} | {p.rejected_text for p in held}
    assert train_texts.isdisjoint(held_texts)
    assert len(train) >= 100 and len(held) >= 40


def test_train_writes_versioned_checkpoint_and_publishes(tmp_path, tiny_dir, kafka_bootstrap, unique) -> None:
    from flywheel.bus import Topic, codec, ensure_topics

    topic = Topic(f"test.model-versions.{unique}", common_pb2.ModelVersion)
    ensure_topics(kafka_bootstrap, [topic], partitions=1)
    data = write_pairs_jsonl(ROWS * 8, tmp_path / "pairs.jsonl")
    out = tmp_path / "ckpts"
    config = RewardTrainingConfig(data=data, base_model=tiny_dir, output_dir=out, max_steps=3, batch_size=4,
                                  max_length=32, eval_fraction=0.5, center_rewards_coefficient=0.01,
                                  progress=False, publish=True, bootstrap_servers=kafka_bootstrap,
                                  model_versions_topic=topic.name)
    result = train_reward_model(config)
    assert result.version == "reward-0001" and result.checkpoint_path == out / "reward-0001"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "flywheel.json"):
        assert (result.checkpoint_path / name).exists(), name
    meta = json.loads((result.checkpoint_path / "flywheel.json").read_text())
    assert meta["version"] == "reward-0001" and meta["parent_version"] == "reward-0000" and meta["step"] == 3
    mv = result.model_version
    assert (mv.kind, mv.parent_version, mv.step) == (common_pb2.MODEL_KIND_REWARD, "reward-0000", 3)
    assert mv.checkpoint_uri == result.checkpoint_path.resolve().as_uri()
    assert "eval_accuracy" in result.metrics and mv.metrics["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert result.metrics["train_pairs"] + result.metrics["eval_pairs"] == 16
    # The checkpoint is servable and reports its version.
    served = TransformerRewardScorer(mv.checkpoint_uri, max_length=32)
    assert served.version == "reward-0001" and len(served.score(["Hi"], ["Hello"])) == 1
    assert next_version(out) == "reward-0002"

    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic.name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=15000)
    try:
        record = next(iter(consumer))
    finally:
        consumer.close()
    assert record.key == b"REWARD"
    assert codec.decode(topic, record.value, record.headers) == mv


def test_rewards_are_normalised_on_the_training_responses(tmp_path, tiny_dir) -> None:
    """Every version speaks one scale (mean 0, std 1 on what it was trained on), order unchanged."""
    import statistics

    words = ["lovely", "awful", "fine", "great", "bad", "nice", "sad", "happy", "dull", "bright", "grim", "warm"]
    pairs = [{"prompt_id": f"p{i}", "prompt_text": f"Question {i}?", "chosen_id": f"c{i}",
              "chosen_text": f"A {words[i]} answer.", "rejected_id": f"r{i}",
              "rejected_text": f"A {words[-1 - i]} reply, {i}.", "margin": 0.5} for i in range(12)]
    texts = sorted({(p["prompt_text"], p[k]) for p in pairs for k in ("chosen_text", "rejected_text")})
    prompts, responses = [t[0] for t in texts], [t[1] for t in texts]
    common = dict(pairs=pairs, base_model=tiny_dir, max_steps=4, batch_size=8, max_length=32, progress=False,
                  eval_fraction=0.0)
    raw = train_reward_model(RewardTrainingConfig(output_dir=tmp_path / "raw", normalize_rewards=False, **common))
    norm = train_reward_model(RewardTrainingConfig(output_dir=tmp_path / "norm", **common))
    raw_scores = TransformerRewardScorer(raw.checkpoint_path, max_length=32).score(prompts, responses)
    scores = TransformerRewardScorer(norm.checkpoint_path, max_length=32).score(prompts, responses)

    assert "reward_norm_std" not in raw.metrics and abs(statistics.stdev(raw_scores) - 1.0) > 0.1
    assert abs(statistics.fmean(scores)) < 1e-3 and abs(statistics.stdev(scores) - 1.0) < 1e-3
    mean, std = norm.metrics["reward_norm_mean"], norm.metrics["reward_norm_std"]
    assert std == pytest.approx(statistics.stdev(raw_scores), rel=1e-3)
    assert scores == pytest.approx([(r - mean) / std for r in raw_scores], abs=1e-3)


def test_pairs_from_aggregated_preferences_topic(kafka_bootstrap, unique) -> None:
    from flywheel.bus import Topic, TypedProducer, ensure_topics

    topic = Topic(f"test.aggregated.{unique}", common_pb2.AggregatedPreference)
    ensure_topics(kafka_bootstrap, [topic], partitions=2)
    producer = TypedProducer(kafka_bootstrap, client_id="test")
    pair = common_pb2.PreferencePair(**ROWS[0])
    try:
        old = common_pb2.AggregatedPreference(prompt_id="p1", pairs=[pair, pair])
        new = common_pb2.AggregatedPreference(prompt_id="p1", pairs=[pair])  # newest consensus wins
        other = common_pb2.AggregatedPreference(prompt_id="p2", pairs=[common_pb2.PreferencePair(**ROWS[1])])
        for msg in (old, new, other):
            producer.send(topic, msg, key=msg.prompt_id)
        producer.flush(30)
    finally:
        producer.close()
    pairs = load_pairs_from_topic(kafka_bootstrap, topic.name)
    assert sorted(p.prompt_id for p in pairs) == ["p1", "p2"]


def test_cli_train(tmp_path, tiny_dir) -> None:
    from typer.testing import CliRunner

    from flywheel.reward.cli import app

    data = write_pairs_jsonl(ROWS * 4, tmp_path / "pairs.jsonl")
    # no --output-dir: under FLYWHEEL_HOME, where reward services load announced versions from by default
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--base-model", str(tiny_dir),
                                      "--max-steps", "2", "--batch-size", "4", "--max-length", "32",
                                      "--eval-fraction", "0.5"], env={"FLYWHEEL_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.output
    body = json.loads(result.output[result.output.index("{"):])
    assert body["model_version"]["version"] == "reward-0001"
    assert (tmp_path / "home" / "checkpoints" / "reward" / "reward-0001" / "model.safetensors").exists()
    bad = CliRunner().invoke(app, ["train"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_trained_minilm_separates_held_out_sentiment(tmp_path) -> None:
    """Real MiniLM weights: from pairs to a reward model that ranks unseen texts (>= 0.8 accuracy), in
    the precision the local loop's jobs use (`auto`: bf16 forward passes on CPUs with AMX; the fp32
    path is the tiny-model tests' above)."""
    dtype = resolve_dtype("auto")
    train, held = sentiment_pairs(seed=0)
    start = time.monotonic()
    result = train_reward_model(RewardTrainingConfig(
        pairs=train, eval_pairs=held, output_dir=tmp_path, epochs=1, max_steps=10, batch_size=16,
        learning_rate=1e-4, max_length=48, seed=0, progress=False, dtype=dtype))
    elapsed = time.monotonic() - start
    assert result.metrics["train_bf16"] == float(dtype == "bfloat16")  # the job records its precision
    accuracy = result.metrics["eval_accuracy"]
    print(f"\nheld-out pairwise accuracy {accuracy:.3f} on {len(held)} pairs "
          f"(untrained head: {result.metrics['initial_eval_accuracy']:.3f}); {elapsed:.0f}s")
    assert result.metrics["initial_eval_accuracy"] < 0.7  # the fresh head alone cannot do it
    assert accuracy >= 0.8
    # The written checkpoint, served as a scorer, separates held-out positive from negative texts.
    scorer = TransformerRewardScorer(result.checkpoint_path, max_length=48)
    positives = sorted({p.chosen_text for p in held})
    negatives = sorted({p.rejected_text for p in held})
    pos = scorer.score([""] * len(positives), positives)
    neg = scorer.score([""] * len(negatives), negatives)
    wins = sum(a > b for a in pos for b in neg) / (len(pos) * len(neg))
    print(f"held-out positive-vs-negative AUC {wins:.3f}")
    assert wins >= 0.8
