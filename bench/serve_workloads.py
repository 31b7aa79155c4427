"""Serving-benchmark workloads (which pack, prompt and arrival time each request has) and their metrics.

A workload is a fixed list of requests. Popularity: `uniform` cycles through a seeded
permutation of the packs, so with at least as many packs as batch rows every batch mixes
distinct packs; `zipf` draws pack k with probability ∝ 1/k. Order: `mixed` keeps that
sequence, `grouped` sorts it by pack (arrivals grouped by skill, the best case for
systems that serve one skill at a time). Arrivals: `closed` submits everything at time 0
(a saturation run: the batch bound keeps `max_batch` requests running), `open` spaces
requests by seeded exponential gaps at `rate` requests/s whatever the system's progress.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

POPULARITY = ("uniform", "zipf")
ORDERS = ("mixed", "grouped")
ARRIVALS = ("closed", "open")
MAX_REQUESTS = 4096


@dataclass(frozen=True)
class Request:
    index: int
    pack: str | None  # None = the base model alone
    prompt_ids: tuple[int, ...]
    arrival: float  # seconds after the run starts
    max_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    num_packs: int
    popularity: str = "uniform"
    order: str = "mixed"
    arrival: str = "closed"
    rate: float | None = None  # requests/s, open-loop only
    num_requests: int = 8
    prompt_tokens: int = 16
    max_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.popularity not in POPULARITY or self.order not in ORDERS or self.arrival not in ARRIVALS:
            raise ValueError(f"popularity={self.popularity!r}, order={self.order!r}, arrival={self.arrival!r}; "
                             f"expected one of {POPULARITY}, {ORDERS}, {ARRIVALS}.")
        if self.arrival == "open" and not (self.rate and self.rate > 0):
            raise ValueError(f"rate={self.rate!r}; an open-loop workload needs a positive rate in requests/s.")
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests={self.num_requests}; expected 1..{MAX_REQUESTS}.")
        if self.num_packs < 0 or self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"num_packs={self.num_packs}, prompt_tokens={self.prompt_tokens}, "
                             f"max_tokens={self.max_tokens}; expected >= 0, >= 1, >= 1.")

    @property
    def label(self) -> str:
        rate = f"@{self.rate:g}/s" if self.arrival == "open" else ""
        return (f"{self.num_packs}p-{self.popularity}-{self.order}-{self.arrival}{rate}"
                f"-p{self.prompt_tokens}-n{self.num_requests}")


def make_requests(spec: WorkloadSpec, pack_names: list[str], vocab_size: int) -> list[Request]:
    """The workload's requests; prompts are seeded token ids from the upper 7/8 of the vocabulary
    (clear of the special tokens at its start)."""
    if spec.num_packs > len(pack_names):
        raise ValueError(f"the workload wants {spec.num_packs} packs but only {len(pack_names)} exist.")
    rng = random.Random(spec.seed)
    names = pack_names[: spec.num_packs]
    if not names:
        packs = [None] * spec.num_requests
    elif spec.popularity == "uniform":
        cycle = rng.sample(names, len(names))
        packs = [cycle[i % len(cycle)] for i in range(spec.num_requests)]
    else:
        weights = [1.0 / (k + 1) for k in range(len(names))]
        packs = rng.choices(names, weights=weights, k=spec.num_requests)
    if spec.order == "grouped":
        packs.sort(key=lambda p: names.index(p) if p is not None else -1)
    # prompts and gaps have their own seeded streams: the same seed gives the same prompts
    # whatever the packs, so workloads that differ only in packs compare like for like
    low, prompt_rng, gap_rng = vocab_size // 8, random.Random(f"{spec.seed}-prompts"), random.Random(f"{spec.seed}-gaps")
    prompts = [tuple(prompt_rng.randrange(low, vocab_size) for _ in range(spec.prompt_tokens))
               for _ in range(spec.num_requests)]
    t, arrivals = 0.0, []
    for _ in range(spec.num_requests):
        arrivals.append(t)
        if spec.arrival == "open":
            t += gap_rng.expovariate(spec.rate)
    return [Request(i, packs[i], prompts[i], arrivals[i], spec.max_tokens) for i in range(spec.num_requests)]


@dataclass
class RequestResult:
    index: int
    arrival: float
    first_token: float
    finish: float
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # over HTTP, where only text comes back


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results: list[RequestResult]) -> dict:
    """Throughput (generated tokens over the span from first arrival to last finish), time to
    first token and time per output token after the first (p50/p99, seconds)."""
    tokens = sum(len(r.tokens) for r in results)
    span = max(r.finish for r in results) - min(r.arrival for r in results)
    ttft = [r.first_token - r.arrival for r in results]
    tpot = [(r.finish - r.first_token) / (len(r.tokens) - 1) for r in results if len(r.tokens) > 1]
    e2e = [r.finish - r.arrival for r in results]
    return {
        "requests": len(results), "tokens": tokens, "seconds": span,
        "tokens_per_s": tokens / span if span > 0 else math.nan,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
        "latency_p99": percentile(e2e, 99),
    }
