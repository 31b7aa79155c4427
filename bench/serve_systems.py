"""The serving systems the benchmark compares, each running a workload into per-request timings.

- `EngineSystem`: this server's engine. `use_packs=False` strips every request's pack
  (system 1, the base model alone); `use_packs=True` mixes packs in every batch (system 3).
- `GroupedSystem`: one skill at a time on the same engine. Before each group of
  requests for one pack the pack's dequantized ΔW is added into the base weights, and
  subtracted after (peft's merge/unmerge). `switch="swap"` counts that time (system 4,
  naive swap); `switch="free"` stops the clock while it happens, which is what holding
  one dense merged model per pack in memory costs (system 2; memory N × model).
- `HFSystem`: transformers `generate` with static batches of up to `max_batch` arrived
  requests. With adapters it is peft's mixed-batch LoRA forward (`adapter_names`,
  system 5); without, the plain dense model (a merged model's cost in that runtime).

Times come from a `Clock` that a "free" switch can stop; arrivals wait on it, so stopping
it freezes the whole simulated world, arrivals included.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import torch

from bench.serve_workloads import Request, RequestResult
from skillpack_server.engine.types import GenerationRequest, SamplingParams
from skillpacks.format import read_pack


class Clock:
    """Seconds since `start()`, minus the time spent inside `stopped()`."""

    def __init__(self):
        self._t0, self._stopped = time.perf_counter(), 0.0

    def start(self) -> None:
        self._t0, self._stopped = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self._t0 - self._stopped

    @contextmanager
    def stopped(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self._stopped += time.perf_counter() - t

    async def wait_until(self, t: float) -> None:
        # re-check after waking: a stopped clock makes the wall-time sleep end early
        while (delay := t - self.now()) > 0:
            await asyncio.sleep(delay)


async def run_on_engine(engine, request: Request, packs: list[tuple[str, float]], clock: Clock) -> RequestResult:
    """Submit one request to the engine at its arrival time and time its tokens."""
    await clock.wait_until(request.arrival)
    sampling = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
    gen = GenerationRequest(f"bench-{request.index}", list(request.prompt_ids), packs, sampling)
    tokens, first = [], None
    async for event in engine.generate(gen):
        if event.is_prompt:
            continue
        if first is None:
            first = clock.now()
        tokens.append(event.token_id)
    return RequestResult(request.index, request.arrival, first, clock.now(), tokens)


class EngineSystem:
    def __init__(self, engine, use_packs: bool):
        self.engine, self.use_packs = engine, use_packs
        self.name = "skillpack" if use_packs else "base"
        self.stats: dict = {}

    def run(self, requests: list[Request]) -> list[RequestResult]:
        clock = Clock()
        before = self.engine.pack_cache.stats()

        async def main():
            clock.start()
            return await asyncio.gather(*[
                run_on_engine(self.engine, r, [(r.pack, 1.0)] if self.use_packs and r.pack else [], clock)
                for r in requests])

        results = asyncio.run(main())
        after = self.engine.pack_cache.stats()
        self.stats = {k: after[k] - before[k] for k in ("hits", "misses", "loads", "evictions", "load_seconds")}
        return results


class WeightSwapper:
    """Adds a pack's dense ΔW into the engine's base weights and takes it out again."""

    def __init__(self, engine, pack_paths: dict):
        self.engine, self.paths = engine, pack_paths
        self.parsed: dict = {}  # name -> SkillPack, kept in host memory like the engine's pack cache

    def _apply(self, name: str, sign: float) -> None:
        pack = self.parsed.get(name) or self.parsed.setdefault(name, read_pack(self.paths[name]))
        model = self.engine.model
        with self.engine.pack_cache.device_lock, torch.inference_mode():
            for tensor, delta in pack.deltas.items():
                weight = model.get_submodule(tensor.removesuffix(".weight")).weight
                a, b = (f.to(weight.device) for f in delta.factors(torch.float32))
                weight.add_(((b * (sign * delta.s.to(weight.device))) @ a).to(weight.dtype))

    def merge(self, name: str) -> None:
        self._apply(name, 1.0)

    def unmerge(self, name: str) -> None:
        self._apply(name, -1.0)


class GroupedSystem:
    """Serves the pack of the oldest waiting request: switches the weights to it, runs every
    waiting request for it as one group, and repeats."""

    def __init__(self, engine, swapper: WeightSwapper, switch: str):
        if switch not in ("swap", "free"):
            raise ValueError(f"switch={switch!r}; expected 'swap' (timed) or 'free' (merged models).")
        self.engine, self.swapper, self.switch = engine, swapper, switch
        self.name = "swap" if switch == "swap" else "merged"
        self.stats: dict = {}

    def run(self, requests: list[Request]) -> list[RequestResult]:
        clock = Clock()
        switches: list[float] = []
        for name in {r.pack for r in requests if r.pack}:  # parse outside the run, as the engine's host cache does
            self.swapper.parsed.setdefault(name, read_pack(self.swapper.paths[name]))

        def switch_to(old: str | None, new: str | None) -> None:
            t = time.perf_counter()
            if old:
                self.swapper.unmerge(old)
            if new:
                self.swapper.merge(new)
            switches.append(time.perf_counter() - t)

        async def main():
            clock.start()
            waiting: list[Request] = []
            arrived = asyncio.Event()

            async def arrive(r: Request):
                await clock.wait_until(r.arrival)
                waiting.append(r)
                arrived.set()

            feeders = [asyncio.create_task(arrive(r)) for r in requests]
            results, current = [], None
            try:
                while len(results) < len(requests):
                    if not waiting:
                        arrived.clear()
                        await arrived.wait()
                        continue
                    pack = min(waiting, key=lambda r: (r.arrival, r.index)).pack
                    group = [r for r in waiting if r.pack == pack]
                    waiting[:] = [r for r in waiting if r.pack != pack]
                    if pack != current:
                        if self.switch == "free":
                            with clock.stopped():
                                switch_to(current, pack)
                        else:
                            switch_to(current, pack)
                        current = pack
                    results += await asyncio.gather(*[run_on_engine(self.engine, r, [], clock) for r in group])
            finally:
                if current:
                    switch_to(current, None)
                await asyncio.gather(*feeders)
            return results

        results = asyncio.run(main())
        self.stats = {"switches": len(switches) - 1 if switches else 0,
                      "switch_s_mean": sum(switches) / len(switches) if switches else 0.0}
        return sorted(results, key=lambda r: r.index)


class FirstTokenTimer:
    """A transformers streamer that notes when the first generated token of a batch appears."""

    def __init__(self, clock: Clock):
        self.clock, self.calls, self.first = clock, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = self.clock.now()

    def end(self) -> None:
        pass


class HFSystem:
    """Static batches on a transformers model (optionally a PeftModel holding one adapter per pack)."""

    def __init__(self, model, max_batch: int, pad_id: int, adapters: bool, name: str):
        self.model, self.max_batch, self.pad_id = model, max_batch, pad_id
        self.adapters, self.name = adapters, name
        self.stats: dict = {}

    def run(self, requests: list[Request]) -> list[RequestResult]:
        clock = Clock()
        pending = sorted(requests, key=lambda r: (r.arrival, r.index))
        results = []
        clock.start()
        while pending:
            now = clock.now()
            if pending[0].arrival > now:
                time.sleep(pending[0].arrival - now)
                continue
            batch = [r for r in pending if r.arrival <= now][: self.max_batch]
            pending = [r for r in pending if r not in batch]
            results += self._generate(batch, clock)
        return sorted(results, key=lambda r: r.index)

    def _generate(self, batch: list[Request], clock: Clock) -> list[RequestResult]:
        width = max(len(r.prompt_ids) for r in batch)
        device = next(self.model.parameters()).device
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's last prompt token is at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        new = max(r.max_tokens for r in batch)
        kwargs = {}
        if self.adapters:
            kwargs["adapter_names"] = [r.pack or "__base__" for r in batch]
        timer = FirstTokenTimer(clock)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=self.pad_id,
                                      streamer=timer, **kwargs)
        end = clock.now()
        return [RequestResult(r.index, r.arrival, timer.first, end, out[i, width: width + r.max_tokens].tolist())
                for i, r in enumerate(batch)]
