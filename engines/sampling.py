"""Choosing the next token: greedy, or temperature with nucleus (top-p) sampling.

A sampled token draws from a generator seeded by (request seed, token index), not from a
stream shared by the whole request: the prefill engine can sample token 0 and a decode
engine in another process token 1 onward, and a seeded request still gives exactly the
tokens it gives when one process runs it all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """These params with a seed fixed (a random one if none was given), so that every
        engine that runs part of the request draws the same tokens."""
        if self.seed is not None or self.is_greedy:
            return self
        return replace(self, seed=int(torch.seed() % (1 << 62)))


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Token ``index`` (0 = the first generated token) from one row of logits (``[vocab]``).
    Sampled params must carry a seed (`SamplingParams.with_seed`)."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    if params.seed is None:
        raise ValueError("sampling needs a seed: use SamplingParams.with_seed()")
    generator = torch.Generator()
    generator.manual_seed((params.seed * 1_000_003 + index) % (1 << 63))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
