"""The in-process generation engine: batched sampling with the behaviour logprob of every token.

Reusable without gRPC or Kafka (the trainer's evaluation and the demo loop call it directly):

    engine = PolicyEngine.from_checkpoint()              # SmolLM2-135M-Instruct, "policy-0000"
    [[c]] = engine.generate(["Say hi"], SamplingConfig(temperature=0.7, max_new_tokens=16, seed=1))
    c.token_ids, c.logprobs, c.text, c.finish_reason, c.policy_version

Logprob convention (the trainer relies on it; see docs/policy.md): for every response token,
`logprob = log_softmax(logits / temperature)[token]`, computed in float32 from the model's
next-token logits BEFORE top-k / top-p filtering. With temperature 0 (greedy) the logits are not
scaled: `log_softmax(logits)[token]`. The trainer recomputes log pi with the same temperature
scaling, so the PPO ratio is exactly 1 at the behaviour policy.

The decode loop is our own (not `model.generate`): every row of a batch has its own temperature,
top-k, top-p, seed, stop strings and token budget; finished rows are dropped from the KV cache
so a batch costs what its live rows cost.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from flywheel.policy.sampling import SamplingConfig, derived_seed
from flywheel.versions import BASE_POLICY_VERSION

log = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_CANCELLED = "cancelled"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(Exception):
    """A checkpoint that cannot serve: missing files, incompatible tokenizer, non-finite outputs."""


def apply_template(tokenizer: Any, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
    """A prompt as the model sees it: the tokenizer's chat template where it has one, else the plain text."""
    if not messages:
        messages = [{"role": "user", "content": text or ""}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


@dataclass
class LoadedPolicy:
    """One loaded policy version: model, tokenizer and what decoding needs to know about them."""

    version: str
    path: Path
    model: Any
    tokenizer: Any
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_positions: int
    device: torch.device
    loaded_at: float = field(default_factory=time.time)
    _prefix: Any = field(default=None, repr=False)
    _prefix_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or self.path.name)

    def template(self, text: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> str:
        """The prompt exactly as the model sees it: the chat template where the tokenizer has one."""
        return apply_template(self.tokenizer, text, messages)

    def encode(self, prompt_text: str) -> list[int]:
        """Token ids of an already templated prompt (the template carries the special tokens)."""
        return list(self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"])

    def prefix(self) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The token ids every chat prompt starts with (system prompt + user header) and their KV.

        Computed once per loaded policy; prompts starting with these ids skip them in prefill.
        """
        if self._prefix is None:
            with self._prefix_lock:
                if self._prefix is None:
                    self._prefix = self._compute_prefix()
        return self._prefix or None

    @torch.inference_mode()
    def _compute_prefix(self) -> Any:
        if not getattr(self.tokenizer, "chat_template", None):
            return ()
        a, b = self.encode(self.template("a")), self.encode(self.template("b"))
        n = 0
        while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
            n += 1
        if n < 4:
            return ()
        from transformers import DynamicCache

        ids = a[:n]
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1)
        return (ids, [(layer.keys, layer.values) for layer in cache.layers])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def load_policy(path: str | Path, version: str, *, device: str = "cpu", dtype: str = "float32",
                validate: bool = True) -> LoadedPolicy:
    """Load a HF causal-LM checkpoint directory (extra files such as value heads are ignored).

    With validate=True the checkpoint must also run: a forward pass over a templated prompt has to
    produce finite logits over a vocabulary that covers the tokenizer. Raises CheckpointError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    except Exception as exc:  # noqa: BLE001 - every load failure is a broken checkpoint
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    eos: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(t) for t in source)
    if not eos:
        raise CheckpointError(f"{path}: neither the tokenizer nor the generation config names an eos token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos)
    max_positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    policy = LoadedPolicy(version=version, path=path, model=model, tokenizer=tokenizer,
                          eos_token_ids=frozenset(eos), pad_token_id=int(pad), max_positions=max_positions,
                          device=torch.device(device))
    if validate:
        _validate(policy)
    return policy


@torch.inference_mode()
def _validate(policy: LoadedPolicy) -> None:
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    if len(policy.tokenizer) > vocab:
        raise CheckpointError(f"{policy.path}: tokenizer has {len(policy.tokenizer)} tokens, model only {vocab}")
    ids = policy.encode(policy.template("Hello"))
    if not ids:
        raise CheckpointError(f"{policy.path}: the tokenizer produced no tokens")
    try:
        logits = policy.model(input_ids=torch.tensor([ids], device=policy.device)).logits
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{policy.path}: forward pass failed: {type(exc).__name__}: {exc}") from exc
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{policy.path}: the model produces non-finite logits")


# --------------------------------------------------------------------------------------------------
# One sequence (prompt x candidate) of a batch
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Sequence_:
    """One row of a batch: its inputs, and (once generated) its outputs. Filled in by generate_batch."""

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
                    prompt_ids: list[int] | None = None, seed_key: tuple[str, int] | None = None) -> "Sequence_":
        return cls(prompt_text=prompt_text, temperature=config.temperature, top_k=config.top_k,
                   top_p=config.top_p, max_new_tokens=config.max_new_tokens, stop=tuple(config.stop),
                   seed=config.candidate_seed(candidate_index), prompt_ids=prompt_ids, seed_key=seed_key)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


# Public name: `Sequence` clashes with typing.Sequence inside this module only.
GenSequence = Sequence_

StepCallback = Callable[[list[tuple[Sequence_, int, float]]], None]


def _filter_top_k_top_p(logp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and then top-p (on the renormalised top-k mass) remove, row-wise.

    The full-sort reference for `_sample_filtered` (used by tests and diagnostics).
    """
    vocab = logp.shape[-1]
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    position = torch.arange(vocab, device=logp.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    remove = position[None, :] >= k[:, None]
    probs = sorted_lp.exp().masked_fill(remove, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, float("inf")))
    remove |= mass_before > p[:, None]  # keeps the smallest prefix whose mass reaches top_p (>= 1 token)
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logp.masked_fill(mask, float("-inf"))


_WINDOW = 1024  # candidates examined for top-k/top-p before falling back to a full sort


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row's (unnormalised, non-negative) `probs` with uniform `u` in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _sample_filtered(logp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                     window: int = _WINDOW) -> torch.Tensor:
    """Sample from top-k, then top-p (on the renormalised top-k mass), like `_filter_top_k_top_p`.

    Only the `window` most likely tokens are sorted. That is exact whenever the kept set lies in
    the window: always for top_k <= window; for top-p without top-k when the window holds at least
    top_p of the mass. Rows where it does not are redone with a full sort.
    """
    vocab = logp.shape[-1]
    window = min(vocab, max(window, int(top_k.max())))
    values, index = logp.topk(window, dim=-1)  # sorted, most likely first
    probs = values.exp()
    position = torch.arange(window, device=logp.device)
    k = torch.where(top_k > 0, top_k.clamp(max=window), torch.full_like(top_k, window))
    probs = probs.masked_fill(position[None, :] >= k[:, None], 0.0)
    window_mass = probs.sum(dim=-1)
    norm = torch.where(top_k > 0, window_mass, torch.ones_like(window_mass))  # top-k: renormalise
    normalised = probs / norm[:, None]
    p = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, float("inf")))
    remove = (normalised.cumsum(dim=-1) - normalised) > p[:, None]
    chosen = index.gather(1, _inverse_cdf(probs.masked_fill(remove, 0.0), u)[:, None]).squeeze(1)
    if window < vocab:
        short = (top_k <= 0) & (top_p < 1.0) & (window_mass < top_p)
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            wider = vocab if window * 8 >= vocab else window * 8
            chosen[rows] = _sample_filtered(logp[rows], top_k[rows], top_p[rows], u[rows], window=wider)
    return chosen


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  gens: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns (tokens, behaviour logprobs) per the module's convention.

    Sampling is inverse-CDF with one uniform per row from the row's own generator, so a seeded row
    is reproducible whatever else shares its batch.
    """
    logits = logits.float()
    greedy = temperature == 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in gens])
        filtered = (top_k > 0) | (top_p < 1.0)
        plain = (~greedy & ~filtered).nonzero().squeeze(1)
        if plain.numel():
            tokens[plain] = _inverse_cdf(logp[plain].exp(), u[plain])
        warped = (~greedy & filtered).nonzero().squeeze(1)
        if warped.numel():
            tokens[warped] = _sample_filtered(logp[warped], top_k[warped], top_p[warped], u[warped])
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _find_stop(text: str, stops: Iterable[str]) -> int:
    cut = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (cut < 0 or i < cut):
            cut = i
    return cut


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """A running batch on one policy version: rows join (after a batched prefill) at step boundaries
    and leave as soon as they finish, so the engine decodes continuously under load.

    Rows are left-padded; positions are per row (so padding never shifts a row's positions) and the
    KV caches of joining rows are left-padded to the running width before concatenation.
    """

    def __init__(self, policy: LoadedPolicy) -> None:
        self.policy = policy
        self.rows: list[Sequence_] = []
        self.budgets: list[int] = []
        self.cache: Any = None
        self.attention: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.temperature: torch.Tensor | None = None
        self.top_k: torch.Tensor | None = None
        self.top_p: torch.Tensor | None = None
        self.gens: list[torch.Generator] = []

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, seqs: list[Sequence_]) -> list[Sequence_]:
        """Prefill `seqs` and merge them into the batch. Returns rows that finished immediately.

        Prompts that start with the policy's shared chat prefix (system prompt + user header) reuse
        its cached KV and prefill only their own tokens.
        """
        policy, device = self.policy, self.policy.device
        missing = [s for s in seqs if s.prompt_ids is None]
        if missing:
            encoded = policy.tokenizer([s.prompt_text for s in missing], add_special_tokens=False)["input_ids"]
            for s, ids in zip(missing, encoded):
                s.prompt_ids = list(ids)
        now = time.time()
        joining: list[Sequence_] = []
        budgets: list[int] = []
        done: list[Sequence_] = []
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
                joining.append(s)
                budgets.append(budget)
        if not joining:
            return done
        prefix = policy.prefix()
        budget_of = {id(s): b for s, b in zip(joining, budgets)}
        hits = [s for s in joining if prefix is not None and len(s.prompt_ids or []) > len(prefix[0])
                and (s.prompt_ids or [])[:len(prefix[0])] == prefix[0]]
        hit_ids = {id(s) for s in hits}
        misses = [s for s in joining if id(s) not in hit_ids]
        joining = []
        for group, group_prefix in ((hits, prefix), (misses, None)):
            if group:
                self._merge(*self._prefill(group, group_prefix))
                joining.extend(group)
        budgets = [budget_of[id(s)] for s in joining]
        gens = []
        for s in joining:
            g = torch.Generator(device=device)
            g.manual_seed(int(s.seed_used or 0) & ((1 << 63) - 1))
            gens.append(g)
        self.rows.extend(joining)
        self.budgets.extend(budgets)
        self.gens.extend(gens)
        return done

    def _prefill(self, seqs: list[Sequence_], prefix: tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]] | None
                 ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, list[Sequence_]]:
        """One batched forward over the prompts (after the cached shared prefix, when given)."""
        from transformers import DynamicCache

        policy, device = self.policy, self.policy.device
        plen = len(prefix[0]) if prefix is not None else 0
        suffixes = [(s.prompt_ids or [])[plen:] for s in seqs]
        width = max(len(ids) for ids in suffixes)
        input_ids = torch.full((len(seqs), width), policy.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, ids in enumerate(suffixes):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        positions = plen + (attention.cumsum(-1) - 1).clamp_(min=0)
        input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
        cache = DynamicCache()
        if prefix is not None:
            for layer, (keys, values) in enumerate(prefix[1]):
                cache.update(keys.expand(len(seqs), -1, -1, -1).contiguous(),
                             values.expand(len(seqs), -1, -1, -1).contiguous(), layer)
            attention = torch.cat([attention.new_ones((len(seqs), plen)), attention], dim=1)
        out = policy.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, attention, positions[:, -1] + 1, out.logits[:, -1, :], seqs

    def _merge(self, cache: Any, attention: torch.Tensor, next_position: torch.Tensor, logits: torch.Tensor,
               seqs: list[Sequence_]) -> None:
        device = self.policy.device
        temperature = torch.tensor([s.temperature for s in seqs], dtype=torch.float32, device=device)
        top_k = torch.tensor([s.top_k for s in seqs], dtype=torch.long, device=device)
        top_p = torch.tensor([s.top_p for s in seqs], dtype=torch.float32, device=device)
        if self.cache is None:
            self.cache, self.attention, self.next_position, self.logits = cache, attention, next_position, logits
            self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
            return
        assert self.attention is not None
        merged = max(self.attention.shape[1], attention.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, merged, -2), _left_pad(theirs.keys, merged, -2)])
            mine.values = torch.cat([_left_pad(mine.values, merged, -2), _left_pad(theirs.values, merged, -2)])
        self.attention = torch.cat([_left_pad(self.attention, merged, 1), _left_pad(attention, merged, 1)])
        self.next_position = torch.cat([self.next_position, next_position])  # type: ignore[list-item]
        self.logits = torch.cat([self.logits, logits])  # type: ignore[list-item]
        self.temperature = torch.cat([self.temperature, temperature])  # type: ignore[list-item]
        self.top_k = torch.cat([self.top_k, top_k])  # type: ignore[list-item]
        self.top_p = torch.cat([self.top_p, top_p])  # type: ignore[list-item]

    @torch.inference_mode()
    def step(self, on_step: StepCallback | None = None) -> list[Sequence_]:
        """Sample one token for every row, retire finished rows, run the next forward pass.

        Returns the rows that finished in this step.
        """
        if not self.rows:
            return []
        policy = self.policy
        assert self.logits is not None and self.temperature is not None
        tokens, logprobs = choose_tokens(self.logits, self.temperature, self.top_k, self.top_p, self.gens)
        token_list, lp_list = tokens.tolist(), logprobs.tolist()
        events: list[tuple[Sequence_, int, float]] = []
        keep: list[int] = []
        finished: list[Sequence_] = []
        for row, s in enumerate(self.rows):
            if s.cancelled:  # the caller gave up: drop the row without another token
                s.finish_reason, s.completed_at = FINISH_CANCELLED, time.time()
                s.text = policy.decode(s.token_ids)
                finished.append(s)
                continue
            token = int(token_list[row])
            s.token_ids.append(token)
            s.logprobs.append(float(lp_list[row]))
            events.append((s, token, float(lp_list[row])))
            if token in policy.eos_token_ids:
                s.finish_reason = FINISH_EOS
            elif s.stop:
                text = policy.decode(s.token_ids)
                cut = _find_stop(text, s.stop)
                if cut >= 0:
                    s.finish_reason, s.text = FINISH_STOP, text[:cut]
            if s.finish_reason is None and len(s.token_ids) >= self.budgets[row]:
                s.finish_reason = FINISH_LENGTH
            if s.finish_reason is None:
                keep.append(row)
            else:
                s.completed_at = time.time()
                if s.finish_reason != FINISH_STOP:
                    s.text = policy.decode(s.token_ids)
                finished.append(s)
        if on_step is not None:
            on_step(events)
        if len(keep) < len(self.rows):
            self._select(keep)
            tokens = tokens[torch.tensor(keep, dtype=torch.long, device=tokens.device)] if keep else tokens[:0]
        if not self.rows:
            self.cache = self.attention = self.logits = None
            return finished
        assert self.attention is not None and self.next_position is not None
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=1)
        out = policy.model(input_ids=tokens[:, None], attention_mask=self.attention,
                           position_ids=self.next_position[:, None], past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1, :]
        self.next_position = self.next_position + 1
        return finished

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[r] for r in keep]
        self.budgets = [self.budgets[r] for r in keep]
        self.gens = [self.gens[r] for r in keep]
        if not keep:
            return
        assert self.attention is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.policy.device)
        self.cache.batch_select_indices(index)
        self.attention = self.attention[index]
        self.next_position = self.next_position[index]  # type: ignore[index]
        self.logits = self.logits[index]  # type: ignore[index]
        self.temperature, self.top_k, self.top_p = (
            self.temperature[index], self.top_k[index], self.top_p[index])  # type: ignore[index]
        # drop padding columns no remaining row needs
        used = self.attention.any(dim=0)
        first = int(torch.nonzero(used)[0, 0]) if bool(used.any()) else 0
        if first > 0:
            self.attention = self.attention[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]


def generate_batch(policy: LoadedPolicy, seqs: list[Sequence_], on_step: StepCallback | None = None) -> None:
    """Generate every sequence of `seqs` in one padded batch, filling in their outputs in place."""
    if not seqs:
        return
    batch = DecodeBatch(policy)
    batch.add(seqs)
    while batch:
        batch.step(on_step)


# --------------------------------------------------------------------------------------------------
# The engine: a current policy that can be swapped atomically
# --------------------------------------------------------------------------------------------------
class PolicyEngine:
    """Holds the serving policy; `swap` replaces it atomically (batches in flight finish on the old one).

    Generation itself is synchronous and single-threaded per batch; callers that share an engine
    across threads serialise batches with `lock` (the async batcher runs all batches on one thread).
    """

    def __init__(self, policy: LoadedPolicy) -> None:
        self._policy = policy
        self.lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, version: str = BASE_POLICY_VERSION, *, device: str = "cpu",
                        dtype: str = "float32") -> "PolicyEngine":
        if path is None:
            from flywheel.models import smollm2_checkpoint

            path = smollm2_checkpoint()
        return cls(load_policy(path, version, device=device, dtype=dtype))

    @property
    def current(self) -> LoadedPolicy:
        return self._policy

    @property
    def version(self) -> str:
        return self._policy.version

    def swap(self, policy: LoadedPolicy) -> LoadedPolicy:
        """Serve `policy` from the next batch on; returns the previous one."""
        old, self._policy = self._policy, policy
        log.info("policy swapped: %s -> %s", old.version, policy.version)
        return old

    def generate(self, prompts: Sequence[str | Sequence[dict[str, str]]], sampling: SamplingConfig, *,
                 max_batch_size: int = 32, on_step: StepCallback | None = None) -> list[list[Sequence_]]:
        """Sample `sampling.n` candidates per prompt (plain text or chat messages), in batches.

        Returns, per prompt, its candidates in candidate order; each carries token ids, behaviour
        logprobs, text, finish reason and the policy version that produced it.
        """
        policy = self.current
        grouped: list[list[Sequence_]] = []
        for prompt in prompts:
            text = policy.template(text=prompt) if isinstance(prompt, str) else policy.template(messages=prompt)
            ids = policy.encode(text)
            grouped.append([Sequence_.from_config(text, sampling, c, list(ids)) for c in range(sampling.n)])
        flat = [s for group in grouped for s in group]
        with self.lock:
            for start in range(0, len(flat), max_batch_size):
                generate_batch(policy, flat[start:start + max_batch_size], on_step)
        return grouped
