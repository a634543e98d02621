"""A running decode batch: rows join after a batched prefill and leave as soon as they finish.

Each step is a handful of tensor operations over all live rows: draw one uniform per row
(counter-based, `sampler.uniforms`), choose tokens and behaviour logprobs (`sampler.choose_tokens`),
record them in preallocated per-row buffers, detect eos / token budget / cancellation as tensors,
retire finished rows (their slots are refilled from the end of the batch) and run the one-token
forward pass over a preallocated KV cache (`kv_cache`). Python touches a row only when it joins,
when it finishes, and for stop strings (which need the decoded text; only rows that have them).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from flywheel.policy.kv_cache import SlotKVCache, decode_forward, prefill_forward
from flywheel.policy.loading import LoadedPolicy
from flywheel.policy.sampler import choose_tokens, uniforms
from flywheel.policy.sampling import SamplingConfig, derived_seed

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_CANCELLED = "cancelled"

# finish codes of one step, as a tensor: 0 = still running
_RUNNING, _EOS, _LENGTH, _CANCELLED, _STOP = 0, 1, 2, 3, 4
_REASONS = {_EOS: FINISH_EOS, _LENGTH: FINISH_LENGTH, _CANCELLED: FINISH_CANCELLED, _STOP: FINISH_STOP}


@dataclass(eq=False)
class Generation:
    """One row of a batch (a prompt x candidate): its inputs, and once generated its outputs."""

    prompt_text: str
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prompt_ids: list[int] | None = None
    # (prompt_id, candidate_index) of an unseeded row: its seed is derived from them and the version
    seed_key: tuple[str, int] | None = None
    # set from any thread to stop this row at the next step (deadline passed, client gone)
    cancelled: bool = False
    # -- outputs ---------------------------------------------------------------------------------
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    seed_used: int | None = None
    policy_version: str = ""
    started_at: float = 0.0
    completed_at: float = 0.0

    @classmethod
    def from_config(cls, prompt_text: str, config: SamplingConfig, candidate_index: int = 0,
                    prompt_ids: list[int] | None = None, seed_key: tuple[str, int] | None = None) -> "Generation":
        return cls(prompt_text=prompt_text, temperature=config.temperature, top_k=config.top_k,
                   top_p=config.top_p, max_new_tokens=config.max_new_tokens, stop=tuple(config.stop),
                   seed=config.candidate_seed(candidate_index), prompt_ids=prompt_ids, seed_key=seed_key)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


StepCallback = Callable[[list[tuple[Generation, int, float]]], None]

# per-row tensors of a batch, reordered together when rows leave
_ROW_STATE = ("positions", "temperature", "top_k", "top_p", "seeds", "counters", "budgets", "has_stop", "logits",
              "out_tokens", "out_logprobs")


def find_stop(text: str, stops: Iterable[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return cut


def _signed64(seed: int) -> int:
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class DecodeBatch:
    """A running batch on one policy version (continuous batching; see the module docstring)."""

    def __init__(self, policy: LoadedPolicy) -> None:
        decoder = policy.decoder()
        if decoder is None:
            raise RuntimeError(f"{policy.path}: the decode engine does not support this architecture")
        self.policy = policy
        self.decoder = decoder
        self.rows: list[Generation] = []
        self.cache = SlotKVCache(decoder, slots=8, capacity=256)
        device = policy.device
        self.eos = torch.tensor(sorted(policy.eos_token_ids), dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # tokens in each row's cache
        self.temperature = torch.zeros(0, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(0, dtype=torch.long, device=device)
        self.top_p = torch.zeros(0, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(0, dtype=torch.long, device=device)
        self.counters = torch.zeros(0, dtype=torch.long, device=device)  # tokens generated so far
        self.budgets = torch.zeros(0, dtype=torch.long, device=device)
        self.has_stop = torch.zeros(0, dtype=torch.bool, device=device)  # rows with stop strings
        self.logits = torch.zeros((0, 0), dtype=torch.float32, device=device)  # next-token logits
        self.out_tokens = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros((0, 0), dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return len(self.rows)

    # -- joining -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def add(self, seqs: list[Generation]) -> list[Generation]:
        """Prefill `seqs` and add them to the batch. Returns rows that finished immediately.

        Prompts that start with the policy's shared chat prefix (system prompt + user header) reuse
        its cached KV and prefill only their own tokens.
        """
        policy = self.policy
        missing = [s for s in seqs if s.prompt_ids is None]
        if missing:
            encoded = policy.tokenizer([s.prompt_text for s in missing], add_special_tokens=False)["input_ids"]
            for s, ids in zip(missing, encoded):
                s.prompt_ids = list(ids)
        now = time.time()
        joining: list[tuple[Generation, int]] = []
        done: list[Generation] = []
        for s in seqs:
            if not s.prompt_ids:
                raise ValueError("empty prompt")
            s.policy_version, s.started_at = policy.version, now
            s.token_ids, s.logprobs, s.text, s.finish_reason = [], [], "", None
            if s.seed is not None:
                s.seed_used = s.seed
            elif s.seed_key is not None:  # known only now: the version this row is generated by
                s.seed_used = derived_seed(s.seed_key[0], policy.version, s.seed_key[1])
            else:
                s.seed_used = secrets.randbits(63)
            budget = max(0, min(s.max_new_tokens, policy.max_positions - len(s.prompt_ids)))
            if budget == 0 or s.cancelled:
                s.finish_reason = FINISH_CANCELLED if s.cancelled else FINISH_LENGTH
                s.completed_at = now
                done.append(s)
            else:
                joining.append((s, budget))
        if not joining:
            return done
        prefix = policy.prefix()
        hits = [(s, b) for s, b in joining if prefix is not None and len(s.prompt_ids or []) > len(prefix[0])
                and (s.prompt_ids or [])[:len(prefix[0])] == prefix[0]]
        hit_ids = {id(s) for s, _ in hits}
        misses = [(s, b) for s, b in joining if id(s) not in hit_ids]
        for group, group_prefix in ((hits, prefix), (misses, None)):
            if group:
                self._join(group, group_prefix)
        return done

    def _join(self, group: list[tuple[Generation, int]], prefix: Any) -> None:
        """Prefill `group` straight into new slots (after the shared prefix's KV, when given) and add its rows."""
        seqs = [s for s, _ in group]
        device = self.policy.device
        plen = len(prefix[0]) if prefix is not None else 0
        lengths = [len(s.prompt_ids or []) for s in seqs]
        budgets = [b for _, b in group]
        first = len(self.rows)
        self.cache.reserve(first + len(seqs), max(n + b for n, b in zip(lengths, budgets)), live=first)
        if prefix is not None:
            self.cache.write_prefix(first, len(seqs), prefix[1])
        own = [(s.prompt_ids or [])[plen:] for s in seqs]
        parts = []
        for lo, hi in _prefill_chunks([len(ids) for ids in own], plen, self.decoder.heads):
            tokens = torch.full((hi - lo, max(len(ids) for ids in own[lo:hi])), self.policy.pad_token_id,
                                dtype=torch.long)
            for row, ids in enumerate(own[lo:hi]):
                tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            own_lengths = torch.tensor([len(ids) for ids in own[lo:hi]], dtype=torch.long, device=device)
            parts.append(prefill_forward(self.decoder, self.cache, tokens.to(device), own_lengths, plen, first + lo))
        logits = torch.cat(parts).float()
        width = max(max(budgets), self.out_tokens.shape[1])
        self.out_tokens = _pad_columns(self.out_tokens, width)
        self.out_logprobs = _pad_columns(self.out_logprobs, width)
        joining = {
            "positions": torch.tensor(lengths, dtype=torch.long),
            "temperature": torch.tensor([s.temperature for s in seqs], dtype=torch.float32),
            "top_k": torch.tensor([s.top_k for s in seqs], dtype=torch.long),
            "top_p": torch.tensor([s.top_p for s in seqs], dtype=torch.float32),
            "seeds": torch.tensor([_signed64(int(s.seed_used or 0)) for s in seqs], dtype=torch.long),
            "counters": torch.zeros(len(seqs), dtype=torch.long),
            "budgets": torch.tensor(budgets, dtype=torch.long),
            "has_stop": torch.tensor([bool(s.stop) for s in seqs], dtype=torch.bool),
            "out_tokens": torch.zeros((len(seqs), width), dtype=torch.long),
            "out_logprobs": torch.zeros((len(seqs), width), dtype=torch.float32),
        }
        for name, value in joining.items():
            setattr(self, name, torch.cat([getattr(self, name), value.to(device)]))
        self.logits = logits if first == 0 else torch.cat([self.logits, logits])
        self.rows.extend(seqs)

    # -- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, on_step: StepCallback | None = None) -> list[Generation]:
        """Sample one token for every row, retire finished rows, run the next forward pass.

        Returns the rows that finished in this step.
        """
        if not self.rows:
            return []
        n = len(self.rows)
        tokens, logprobs = choose_tokens(self.logits, self.temperature, self.top_k, self.top_p,
                                         uniforms(self.seeds, self.counters))
        cancelled_flags = [s.cancelled for s in self.rows]  # set from other threads
        cancelled = torch.tensor(cancelled_flags, device=tokens.device)
        rows = torch.arange(n, device=tokens.device)
        self.out_tokens[rows, self.counters] = tokens  # a cancelled row's write is never counted
        self.out_logprobs[rows, self.counters] = logprobs
        self.counters += (~cancelled).long()
        code = torch.where(torch.isin(tokens, self.eos), _EOS, _RUNNING)
        code = torch.where((code == _RUNNING) & (self.counters >= self.budgets), _LENGTH, code)
        code = torch.where(cancelled, _CANCELLED, code)
        codes = code.tolist()
        cut: dict[int, int] = {}
        for r in (self.has_stop & ((code == _RUNNING) | (code == _LENGTH))).nonzero().squeeze(1).tolist():
            # stop strings need the decoded text: only rows that have them
            at = find_stop(self.policy.decode(self.out_tokens[r, :int(self.counters[r])].tolist()), self.rows[r].stop)
            if at >= 0:
                codes[r], cut[r] = _STOP, at
        if on_step is not None:
            events = [(s, t, lp) for s, t, lp, c in zip(self.rows, tokens.tolist(), logprobs.tolist(), cancelled_flags)
                      if not c]
            on_step(events)
        finished_rows = [r for r, c in enumerate(codes) if c != _RUNNING]
        finished = [self._finish(r, _REASONS[codes[r]], cut.get(r)) for r in finished_rows]
        if finished_rows:
            order = self._retire(finished_rows)
            tokens = tokens[order] if order is not None else tokens[:0]
        if not self.rows:
            return finished
        self.logits = decode_forward(self.decoder, self.cache, tokens, self.positions).float()
        self.positions += 1
        return finished

    def _finish(self, row: int, reason: str, cut: int | None) -> Generation:
        s = self.rows[row]
        count = int(self.counters[row])
        s.token_ids = self.out_tokens[row, :count].tolist()
        s.logprobs = self.out_logprobs[row, :count].tolist()
        text = self.policy.decode(s.token_ids)
        s.text = text[:cut] if cut is not None else text
        s.finish_reason, s.completed_at = reason, time.time()
        return s

    def _retire(self, finished: list[int]) -> torch.Tensor | None:
        """Drop finished rows: the last live rows move into their slots. Returns the new row order."""
        n = len(self.rows)
        gone = set(finished)
        live = n - len(gone)
        if live == 0:
            self.rows = []
            for name in _ROW_STATE:
                setattr(self, name, getattr(self, name)[:0])
            return None
        holes = [r for r in finished if r < live]
        movers = [r for r in range(live, n) if r not in gone]
        self.cache.move(holes, movers)
        order_list = list(range(live))
        for hole, mover in zip(holes, movers):
            order_list[hole] = mover
        order = torch.tensor(order_list, dtype=torch.long, device=self.positions.device)
        self.rows = [self.rows[r] for r in order_list]
        for name in _ROW_STATE:
            setattr(self, name, getattr(self, name)[order])
        return order


PREFILL_SCORES_BYTES = 256 << 20  # attention scores of one prefill chunk (float32), so long prompts fit


def _prefill_chunks(lengths: list[int], start: int, heads: int) -> list[tuple[int, int]]:
    """Consecutive row ranges whose prefill attention scores ([rows, heads, L, start + L] float32, L the
    longest in the range) stay under PREFILL_SCORES_BYTES; a single row always makes a range."""
    chunks, lo, longest = [], 0, 0
    for i, n in enumerate(lengths):
        widest = max(longest, n)
        if i > lo and (i + 1 - lo) * heads * widest * (start + widest) * 4 > PREFILL_SCORES_BYTES:
            chunks.append((lo, i))
            lo, widest = i, n
        longest = widest
    chunks.append((lo, len(lengths)))
    return chunks


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[1] >= width:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], width - t.shape[1]))], dim=1)


def generate_batch(policy: LoadedPolicy, seqs: list[Generation], on_step: StepCallback | None = None) -> None:
    """Generate every sequence of `seqs` in one batch, filling in their outputs in place."""
    if not seqs:
        return
    batch = DecodeBatch(policy)
    batch.add(seqs)
    while batch:
        batch.step(on_step)
