"""Small deterministic preference datasets built from packaged text (no downloads).

`sentiment_pairs`: chatterbot-corpus sentences labelled by VADER. A clearly positive sentence is
"chosen" over a clearly negative one, as the response to a neutral corpus prompt. Sentences are
split into train and held-out sets *before* pairing, so held-out pairs contain only sentences the
model never saw: accuracy on them measures generalisation, not memorisation.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from flywheel.v1 import common_pb2


def corpus_sentences() -> list[str]:
    """Every distinct statement of chatterbot-corpus' English conversations, sorted."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("chatterbot-corpus is not installed")
    root = Path(spec.origin).parent / "data" / "english"
    sentences: set[str] = set()
    for file in sorted(root.glob("*.yml")):
        data = yaml.safe_load(file.read_text()) or {}
        for conversation in data.get("conversations", []) or []:
            for statement in conversation:
                if isinstance(statement, str) and statement.strip():
                    sentences.add(" ".join(statement.split()))
    return sorted(sentences)


def _bucket(text: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def sentiment_pairs(*, threshold: float = 0.5, eval_fraction: float = 0.3, pairs_per_sentence: int = 2,
                    seed: int = 0) -> tuple[list[common_pb2.PreferencePair], list[common_pb2.PreferencePair]]:
    """(train, held_out) PreferencePairs: chosen = VADER compound >= threshold, rejected <= -threshold."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scored = [(s, analyzer.polarity_scores(s)["compound"]) for s in corpus_sentences()]
    positive = [(s, c) for s, c in scored if c >= threshold]
    negative = [(s, c) for s, c in scored if c <= -threshold]
    prompts = [s for s, c in scored if abs(c) < 0.05 and s.endswith("?")]
    if not positive or not negative or not prompts:
        raise ValueError("corpus has too few labelled sentences for this threshold")

    def split(items):
        train = [x for x in items if _bucket(x[0], seed) >= eval_fraction]
        held = [x for x in items if _bucket(x[0], seed) < eval_fraction]
        return train, held

    pos_train, pos_eval = split(positive)
    neg_train, neg_eval = split(negative)
    rng = random.Random(seed)

    def make(pos, neg, tag):
        pairs = []
        k = max(len(pos), len(neg)) * pairs_per_sentence
        for i in range(k):
            chosen, c_score = pos[i % len(pos)]
            rejected, r_score = neg[rng.randrange(len(neg))] if i >= len(neg) else neg[i]
            prompt = prompts[rng.randrange(len(prompts))]
            pid = hashlib.sha256(f"{tag}:{i}:{prompt}".encode()).hexdigest()[:16]
            pairs.append(common_pb2.PreferencePair(
                prompt_id=f"{tag}-{pid}", prompt_text=prompt,
                chosen_id=hashlib.sha256(chosen.encode()).hexdigest()[:16], chosen_text=chosen,
                rejected_id=hashlib.sha256(rejected.encode()).hexdigest()[:16], rejected_text=rejected,
                margin=0.0))
        rng.shuffle(pairs)
        return pairs

    return make(pos_train, neg_train, "train"), make(pos_eval, neg_eval, "eval")
