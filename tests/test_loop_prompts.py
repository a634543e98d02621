from flywheel.loop.prompts import load_prompts, to_proto


def test_corpus_prompts_are_distinct_stable_and_split() -> None:
    prompts = load_prompts()
    assert len(prompts) > 500
    assert len({p.prompt_id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    assert load_prompts() == prompts, "deterministic across calls"
    eval_share = sum(p.split == "eval" for p in prompts) / len(prompts)
    assert 0.08 < eval_share < 0.25
    message = to_proto(prompts[0])
    assert message.prompt_id == prompts[0].prompt_id
    assert message.messages[0].role == "user" and message.messages[0].content == prompts[0].text
    assert message.split in ("train", "eval")
