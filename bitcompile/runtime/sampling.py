"""Choosing the next token from logits (numpy): greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"invalid {name}={value!r}: {rule}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "must be a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "must be an integer >= 0 (0 means no limit)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            bad("top_p", p, "must be in (0, 1]")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            bad("repetition_penalty", r, "must be a finite number > 0 (1 means no penalty)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", self.seed, "must be a non-negative integer or None")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, context: list[int]) -> int:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # extremes end as +-inf, handled
            return self._sample(logits, context)

    def _sample(self, logits: np.ndarray, context: list[int]) -> int:
        p = self.params
        if p.temperature == 0 and p.repetition_penalty == 1.0:  # greedy: the float32 row as it is (no copy)
            return int(np.argmax(logits))
        logits = np.asarray(logits, dtype=np.float64).copy()
        if p.repetition_penalty != 1.0 and context:
            seen = np.unique(np.asarray(context))
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            # an extreme penalty overflows: the largest finite logit still ranks first, nothing is NaN
            logits = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = (logits - logits.max()) / p.temperature  # max first: a tiny temperature gives -inf, not inf - inf
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
