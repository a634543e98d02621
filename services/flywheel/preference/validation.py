"""Field-level validation and normalisation of submitted events.

Every failure is an `InvalidArgument(field, reason)` whose field is the path inside the request
(`response_b.response_id`, `ranks`, or for bulk submits `events[12].ranking.ranks`). Normalisation
fills what the service knows and the rater may leave out: the rater id (from the token), the
submit time, and for known rollouts their text, policy version and prompt text, so the published
event carries full lineage.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Sequence

from flywheel.preference.auth import Authenticator, Principal
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.store import KnownResponse, PreferenceStore
from flywheel.runtime import InvalidArgument, require
from flywheel.v1 import common_pb2

_MAX_CLOCK_SKEW_S = 300.0
# google.protobuf.Timestamp's valid range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z);
# outside it the protobuf conversions raise, so it is checked before any of them runs.
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799


def _check_timestamp(ts, field: str) -> None:
    require(_MIN_TIMESTAMP_S <= ts.seconds <= _MAX_TIMESTAMP_S, field + ".seconds",
            "outside the Timestamp range (years 0001..9999)")
    require(0 <= ts.nanos <= 999_999_999, field + ".nanos", "must be in [0, 999999999]")


def external_response_id(prompt_id: str, text: str) -> str:
    """Deterministic id for a response from outside the loop (same text, same prompt -> same id)."""
    return "ext-" + hashlib.sha256(f"{prompt_id}\0{text}".encode()).hexdigest()[:24]


def ranks_are_valid(ranks: Sequence[int]) -> bool:
    """Dense (1,1,2) or standard competition (1,1,3) ranking of len(ranks) items, 1 = best."""
    if not ranks or min(ranks) != 1:
        return False
    distinct = sorted(set(ranks))
    if distinct == list(range(1, len(distinct) + 1)):
        return True
    return all(r == 1 + sum(1 for q in ranks if q < r) for r in ranks)


class _Ref:
    """A response reference and (computed only when needed) its field path."""

    __slots__ = ("prefix", "ref", "where")

    def __init__(self, prefix: str, ref: common_pb2.ResponseRef, where: int | str) -> None:
        self.prefix, self.ref, self.where = prefix, ref, where

    @property
    def field(self) -> str:
        if isinstance(self.where, int):
            return f"{self.prefix}responses[{self.where}]"
        return self.prefix + self.where


class Validator:
    def __init__(self, settings: PreferenceSettings, store: PreferenceStore) -> None:
        self.settings = settings
        self.store = store
        self._max_id = settings.preference_max_id_chars
        self._max_text = settings.preference_max_text_chars

    # -- static checks -----------------------------------------------------------------------
    def _id(self, value: str, field: str, *, required: bool = True) -> None:
        if (value or not required) and len(value) <= self._max_id and (not value or (
                value.isprintable() and value[0] != " " and value[-1] != " ")):
            return  # fast path: the checks below only run to name what is wrong
        if required:
            require(bool(value), field, "required")
        require(len(value) <= self._max_id, field, f"longer than {self._max_id} characters")
        raise InvalidArgument(field, "must be printable without leading/trailing whitespace")

    def _text(self, value: str, field: str) -> None:
        if len(value) > self._max_text:
            raise InvalidArgument(field, f"longer than {self._max_text} characters")

    def _common(self, body, prefix: str, principal: Principal | None, now: float) -> None:
        self._id(body.event_id, prefix + "event_id")
        if not body.rater_id and principal is not None:
            body.rater_id = principal.rater_id
        self._id(body.rater_id, prefix + "rater_id")
        Authenticator.check_rater(principal, body.rater_id, prefix + "rater_id")
        self._id(body.prompt_id, prefix + "prompt_id")
        self._text(body.prompt_text, prefix + "prompt_text")
        require(body.lead_time_ms >= 0, prefix + "lead_time_ms", "must be >= 0")
        if not body.HasField("submitted_at"):
            body.submitted_at.FromNanoseconds(int(now * 1e9))
        _check_timestamp(body.submitted_at, prefix + "submitted_at")
        if body.HasField("created_at"):
            _check_timestamp(body.created_at, prefix + "created_at")
        submitted = body.submitted_at.ToNanoseconds() / 1e9
        require(submitted <= now + _MAX_CLOCK_SKEW_S, prefix + "submitted_at", "is in the future")
        if body.HasField("created_at"):
            require(body.created_at.ToNanoseconds() / 1e9 <= submitted, prefix + "created_at",
                    "is after submitted_at")

    def _ref(self, r: "_Ref") -> None:
        ref = r.ref
        rid = ref.response_id
        if rid and not (len(rid) <= self._max_id and rid.isprintable() and rid[0] != " " and rid[-1] != " "):
            self._id(rid, r.field + ".response_id", required=False)
        if len(ref.text) > self._max_text:
            raise InvalidArgument(r.field + ".text", f"longer than {self._max_text} characters")
        if len(ref.policy_version) > self._max_id:
            raise InvalidArgument(r.field + ".policy_version", "too long")

    def _static(self, event: common_pb2.PreferenceEvent, prefix: str, principal: Principal | None,
                now: float) -> list[_Ref]:
        kind = event.WhichOneof("event")
        require(kind is not None, prefix.rstrip(".") or "event", "no demonstration, comparison or ranking set")
        body = getattr(event, kind)
        if prefix:
            prefix = f"{prefix}{kind}."
        self._common(body, prefix, principal, now)
        if kind == "demonstration":
            require(bool(body.response_text.strip()), prefix + "response_text", "required")
            self._text(body.response_text, prefix + "response_text")
            return []
        if kind == "comparison":
            require(body.HasField("response_a"), prefix + "response_a", "required")
            require(body.HasField("response_b"), prefix + "response_b", "required")
            require(body.choice in (common_pb2.CHOICE_A, common_pb2.CHOICE_B, common_pb2.CHOICE_TIE),
                    prefix + "choice", "must be CHOICE_A, CHOICE_B or CHOICE_TIE")
            require(math.isfinite(body.strength) and 0.0 <= body.strength <= 1.0, prefix + "strength",
                    "must be in [0, 1] (0 means unspecified)")
            refs = [_Ref(prefix, body.response_a, "response_a"), _Ref(prefix, body.response_b, "response_b")]
        else:
            k = len(body.responses)
            require(k >= 2, prefix + "responses", "a ranking needs at least 2 responses")
            require(k <= self.settings.preference_max_ranking_size, prefix + "responses",
                    f"more than {self.settings.preference_max_ranking_size} responses")
            require(len(body.ranks) == k, prefix + "ranks", f"has {len(body.ranks)} entries for {k} responses")
            require(ranks_are_valid(list(body.ranks)), prefix + "ranks",
                    "not a ranking: use 1..m (ties share a rank, dense or competition style)")
            refs = [_Ref(prefix, r, i) for i, r in enumerate(body.responses)]
        for r in refs:
            self._ref(r)
        return refs

    # -- lineage -----------------------------------------------------------------------------
    def _lineage(self, body, refs: list[_Ref], known: dict[str, KnownResponse], prefix: str) -> None:
        allow_external = self.settings.preference_allow_external_responses
        for r in refs:
            ref = r.ref
            if not ref.response_id:
                require(allow_external, r.field + ".response_id",
                        "required (free-form responses need FLYWHEEL_PREFERENCE_ALLOW_EXTERNAL_RESPONSES)")
                require(bool(ref.text), r.field + ".text", "required for a response without id")
                ref.response_id = external_response_id(body.prompt_id, ref.text)
            hit = known.get(ref.response_id)
            if hit is None:
                require(allow_external, r.field + ".response_id",
                        f"unknown response id {ref.response_id!r} (not a rollout this service has seen)")
                require(bool(ref.text), r.field + ".text", "required for a response that is not a known rollout")
                continue
            if hit.prompt_id != body.prompt_id:
                raise InvalidArgument(r.field + ".response_id",
                                      f"belongs to prompt {hit.prompt_id!r}, not {body.prompt_id!r}")
            if not ref.text:
                ref.text = hit.text
            elif ref.text != hit.text:
                raise InvalidArgument(r.field + ".text", "differs from the recorded response text")
            if not ref.policy_version:
                ref.policy_version = hit.policy_version
            elif ref.policy_version != hit.policy_version:
                raise InvalidArgument(r.field + ".policy_version",
                                      f"differs from the recorded policy version {hit.policy_version!r}")
        ids = [r.ref.response_id for r in refs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            field = prefix + ("responses" if body.DESCRIPTOR.name == "Ranking" else "response_b")
            raise InvalidArgument(field, f"response {dup!r} appears more than once")

    def prepare(self, events: Sequence[common_pb2.PreferenceEvent], prefixes: Sequence[str],
                principal: Principal | None) -> list[common_pb2.PreferenceEvent]:
        """Validate and normalise `events` in place; raises InvalidArgument naming the first bad field.

        `prefixes[i]` is the field path of event i ("" for unary RPCs, "events[i]." for bulk).
        """
        now = time.time()
        out: list[common_pb2.PreferenceEvent] = []
        all_refs: list[list[_Ref]] = []
        for event, prefix in zip(events, prefixes):
            all_refs.append(self._static(event, prefix, principal, now))
            out.append(event)
        wanted = [r.ref.response_id for refs in all_refs for r in refs if r.ref.response_id]
        known = self.store.responses(wanted) if wanted else {}
        missing_prompt = [e for e in out if not getattr(e, e.WhichOneof("event")).prompt_text]
        prompt_texts = self.store.prompt_texts([getattr(e, e.WhichOneof("event")).prompt_id
                                                for e in missing_prompt]) if missing_prompt else {}
        for event, prefix, refs in zip(out, prefixes, all_refs):
            kind = event.WhichOneof("event")
            body = getattr(event, kind)
            path = f"{prefix}{kind}." if prefix else ""
            if refs:
                self._lineage(body, refs, known, path)
            if not body.prompt_text:
                body.prompt_text = prompt_texts.get(body.prompt_id, "")
        return out
