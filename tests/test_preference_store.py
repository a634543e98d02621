"""The preference store's id lookups span SQLite's bound-parameter limit (queried in chunks)."""

from __future__ import annotations

from test_preference_service import rollouts_for

from flywheel.preference.store import _IN_CHUNK, PreferenceStore
from flywheel.v1 import common_pb2


def ranking(event_id: str, prompt_id: str) -> common_pb2.PreferenceEvent:
    return common_pb2.PreferenceEvent(ranking=common_pb2.Ranking(
        event_id=event_id, rater_id="r1", prompt_id=prompt_id, ranks=[1, 2],
        responses=[common_pb2.ResponseRef(response_id=f"{prompt_id}-r{i}") for i in range(2)]))


def test_lookups_of_more_ids_than_one_statement_binds(tmp_path) -> None:
    store = PreferenceStore(tmp_path / "store.sqlite")
    prompts = [f"p{i}" for i in range(_IN_CHUNK + 101)]  # two chunks of prompts, four of responses
    rollouts = [r for p in prompts for r in rollouts_for(p, 2, "v1")]
    store.record_rollouts(rollouts)
    ids = [r.rollout_id for r in rollouts]
    asked = ids + ["missing-1", "missing-2"] + ids[:_IN_CHUNK + 3]  # unknown ids and repeats across chunks
    found = store.responses(asked)
    assert set(found) == set(ids) and found[ids[-1]].prompt_id == prompts[-1]
    texts = store.prompt_texts(prompts + ["nope"])
    assert set(texts) == set(prompts) and texts["p7"] == "prompt p7"

    first = [ranking(f"e{i}", prompts[i]) for i in range(_IN_CHUNK + 50)]
    assert all(store.record_events([(e, None, None) for e in first]))
    # a batch straddling the stored ones: exactly the already-stored ids are reported as not new
    again = [ranking(f"e{i}", prompts[i % len(prompts)]) for i in range(_IN_CHUNK, 2 * _IN_CHUNK + 20)]
    inserted = store.record_events([(e, None, None) for e in again])
    assert inserted == [i >= _IN_CHUNK + 50 for i in range(_IN_CHUNK, 2 * _IN_CHUNK + 20)]
    stored = store.events([f"e{i}" for i in range(2 * _IN_CHUNK + 30)])
    assert set(stored) == {f"e{i}" for i in range(2 * _IN_CHUNK + 20)}
    assert stored["e3"].kind == "ranking" and stored["e3"].prompt_id == "p3"
