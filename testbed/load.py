"""The load test's driver: concurrent streaming clients with mixed packs against a real server
while an admin task uploads, replaces, pins, unpins and deletes a pack.

Every response must be a complete SSE stream; every greedy request on a pack that never
changes is checked against the merged-model reference (transformers on base + the pack's
dense delta), and the server's RSS is sampled throughout. `bench/load.py` runs it for
minutes and writes the table; tests/reliability runs it for seconds.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "load-test-admin-token"
MiB = 1024 * 1024
STABLE = ("steady-a", "steady-b", "steady-c")  # never changed during a run: their outputs are checked
CHURN = "churn"  # uploaded, replaced, pinned and deleted while clients use it


# ---- the server under test -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`skillpack serve` in its own process on 127.0.0.1, so it can be SIGKILLed and measured."""

    def __init__(self, base: Path, packs: Path, log_path: Path, *, max_model_len: int = 128,
                 extra: tuple[str, ...] = ()):
        self.base, self.packs, self.log_path = Path(base), Path(packs), Path(log_path)
        self.max_model_len = max_model_len
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 300.0) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "skillpacks.cli", "serve", "--base", str(self.base), "--packs",
               str(self.packs), "--host", "127.0.0.1", "--port", str(port), "--admin-token", ADMIN_TOKEN,
               "--max-model-len", str(self.max_model_len), "--log-level", "warning", *self.extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (0 once it is gone)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except (OSError, AttributeError):
            return 0
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) * 1024 if match else 0

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or cleaned up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- packs and their reference ----------------------------------------------------------

def noise_pack(base: Path, out: Path, name: str, seed: int, strength: float = 0.5) -> Path:
    """A pack of seeded rank-4 deltas on every attention and MLP matrix, each with norm
    `strength` x the base weight's norm (loud enough that packs give different text)."""
    from skillpacks.checkpoint import open_checkpoint
    from skillpacks.compress import Recipe, compress_with_recipe
    from skillpacks.deltas import ModuleRecord
    from skillpacks.fingerprint import base_fingerprint
    from skillpacks.format import write_pack
    from skillpacks.module_kinds import module_kind

    ckpt = open_checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    methods = {"LowRankDelta": "lowrank", "SparseDelta": "sparse", "ExactDelta": "exact"}
    deltas, records = {}, []
    for tname in ckpt.names():
        kind = module_kind(tname)
        if kind not in ("attention", "mlp") or len(ckpt.shape(tname)) != 2:
            continue
        weight = ckpt.get(tname).float()
        noise = torch.randn(weight.shape[0], 4, generator=g) @ torch.randn(4, weight.shape[1], generator=g)
        delta = noise * (strength * weight.norm() / noise.norm())
        compressed, stats = compress_with_recipe(kind, delta, Recipe())
        deltas[tname] = compressed
        records.append(ModuleRecord(tname, kind, methods[type(compressed).__name__], list(delta.shape), stats))
    write_pack(out, name, f"load-test pack {name}", base_fingerprint(ckpt), deltas, records, {"tool": "bench.load"})
    return out


class Reference:
    """Greedy text from transformers on base + Σ weight x the packs' dense deltas (the oracle)."""

    def __init__(self, base: Path, pack_paths: dict[str, Path]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base, self.pack_paths = base, pack_paths
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self._model_class = AutoModelForCausalLM
        self._models: dict[tuple, torch.nn.Module] = {}
        config = json.loads((base / "config.json").read_text())
        eos = config.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)

    def _model(self, mix: tuple[tuple[str, float], ...]):
        if mix not in self._models:
            from skillpacks.format import read_pack

            model = self._model_class.from_pretrained(self.base, dtype=torch.float32, use_safetensors=True).eval()
            with torch.no_grad():
                for name, weight in mix:
                    for tname, delta in read_pack(self.pack_paths[name]).deltas.items():
                        model.get_parameter(tname).add_(weight * delta.dense(torch.float32))
            self._models[mix] = model
        return self._models[mix]

    def greedy(self, mix: tuple[tuple[str, float], ...], prompt: list[int], max_tokens: int):
        """(text, per-token logprobs) the server must give for a greedy request."""
        model, ids, out, logprobs = self._model(mix), list(prompt), [], []
        with torch.no_grad():
            for _ in range(max_tokens):
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
                token = int(logp.argmax())
                ids.append(token)
                out.append(token)
                logprobs.append(float(logp[token]))
                if token in self.eos:
                    break
        return self.tokenizer.decode(out, skip_special_tokens=True), logprobs


# ---- the run ------------------------------------------------------------------------------

@dataclass
class LoadConfig:
    clients: int = 8
    seconds: float = 60.0
    max_tokens: int = 12
    prompt_tokens: int = 12
    admin_every_s: float = 0.5  # pause between admin operations
    rss_every_s: float = 0.25
    warmup_fraction: float = 0.3  # RSS before this part of the run is warm-up
    max_checks: int = 64  # greedy responses compared with the reference (the sample)
    seed: int = 0


@dataclass
class LoadResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)  # failed or malformed responses
    wrong: list[str] = field(default_factory=list)  # responses that differ from the reference
    checked: int = 0
    deleted_404: int = 0  # requests on the churn pack that arrived while it was deleted
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    admin_ops: dict[str, int] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    seconds: float = 0.0

    def summary(self, warmup_fraction: float) -> dict:
        lat = sorted(self.latencies_s)
        ttft = sorted(self.ttft_s)
        cut = self.seconds * warmup_fraction
        warm = [b for t, b in self.rss if t >= cut]
        after_warmup = [b for t, b in self.rss if cut <= t < cut + max(1.0, (self.seconds - cut) / 3)]
        return {
            "requests": self.requests, "errors": len(self.errors), "wrong": len(self.wrong),
            "checked_against_reference": self.checked, "churn_404_while_deleted": self.deleted_404,
            "requests_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "p50_latency_s": round(_quantile(lat, 0.50), 4), "p99_latency_s": round(_quantile(lat, 0.99), 4),
            "p99_ttft_s": round(_quantile(ttft, 0.99), 4),
            "admin_ops": self.admin_ops,
            "peak_rss_mib": round(max((b for _, b in self.rss), default=0) / MiB, 1),
            "rss_after_warmup_mib": round(max(after_warmup, default=0) / MiB, 1),
            "rss_growth_after_warmup_mib": round((max(warm, default=0) - max(after_warmup, default=0)) / MiB, 1),
            "error_samples": self.errors[:5], "wrong_samples": self.wrong[:5],
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def mixes(base_id: str) -> list[dict]:
    """The request kinds the clients cycle through (the body's model/skillpacks fields)."""
    return [
        {"model": base_id},
        {"model": STABLE[0]},
        {"model": STABLE[1]},
        {"model": STABLE[2]},
        {"model": base_id, "skillpacks": [{"name": STABLE[0], "weight": 0.5}, {"name": STABLE[1], "weight": 0.5}]},
        {"model": CHURN},
    ]


def mix_key(body: dict, base_id: str) -> tuple[tuple[str, float], ...]:
    if "skillpacks" in body:
        return tuple((p["name"], p["weight"]) for p in body["skillpacks"])
    return () if body["model"] == base_id else ((body["model"], 1.0),)


async def stream_completion(http: httpx.AsyncClient, body: dict) -> tuple[int, str, list[float], str | None, float]:
    """One streaming completion: (status, text, token logprobs, finish_reason, time to first byte).
    Raises ValueError when the stream is malformed or carries an in-band error."""
    t0 = time.perf_counter()
    ttft = None
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode(errors="replace"), [], None, 0.0
        text, logprobs, finish, done = [], [], None, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                raise ValueError(f"not an SSE data line: {line[:200]!r}")
            payload = line[6:]
            if done:
                raise ValueError("data after [DONE]")
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                raise ValueError(f"in-band error: {event['error']}")
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            choice = event["choices"][0]
            text.append(choice["text"])
            if choice.get("logprobs"):
                logprobs.extend(choice["logprobs"]["token_logprobs"])
            finish = choice.get("finish_reason") or finish
        if not done or finish not in ("stop", "length"):
            raise ValueError(f"stream ended without [DONE] or a finish reason (done={done}, finish={finish})")
    return 200, "".join(text), logprobs, finish, ttft or 0.0


async def client_loop(i: int, url: str, base_id: str, cfg: LoadConfig, deadline: float, res: LoadResult,
                      checks: list) -> None:
    rng = random.Random(cfg.seed * 1000 + i)
    kinds = mixes(base_id)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            body = dict(rng.choice(kinds))
            prompt = [rng.randrange(3, 300) for _ in range(rng.randint(2, cfg.prompt_tokens))]
            greedy = rng.random() < 0.5
            body |= {"prompt": prompt, "max_tokens": rng.randint(1, cfg.max_tokens), "logprobs": 0,
                     "temperature": 0.0 if greedy else 0.8, "seed": rng.randrange(2**31)}
            t0 = time.perf_counter()
            try:
                status, text, logprobs, _, ttft = await stream_completion(http, body)
            except (ValueError, httpx.HTTPError) as e:
                res.requests += 1
                res.errors.append(f"{body.get('model')}: {type(e).__name__}: {e}")
                continue
            res.requests += 1
            if status == 404 and body["model"] == CHURN and "does not exist" in text:
                res.deleted_404 += 1
                continue
            if status != 200:
                res.errors.append(f"{body.get('model')}: HTTP {status}: {text[:300]}")
                continue
            res.latencies_s.append(time.perf_counter() - t0)
            res.ttft_s.append(ttft)
            if greedy and body["model"] != CHURN and len(checks) < cfg.max_checks:
                checks.append((mix_key(body, base_id), prompt, body["max_tokens"], text, logprobs))


async def admin_loop(url: str, pack_files: dict[str, bytes], cfg: LoadConfig, deadline: float,
                     res: LoadResult) -> None:
    """Upload, replace (a different pack's bytes under the same name), pin, unpin, delete."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    variants = [pack_files[n] for n in STABLE]
    step = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as http:
        while time.monotonic() < deadline:
            op = ("upload", "pin", "replace", "unpin", "delete")[step % 5]
            if op in ("upload", "replace"):
                r = await http.post("/admin/skillpacks", files={"file": ("p.skillpack", variants[step % 3])},
                                    data={"name": CHURN, "replace": "true"})
                ok = r.status_code == 201
            elif op == "delete":
                r = await http.delete(f"/admin/skillpacks/{CHURN}")
                ok = r.status_code == 200
            else:
                r = await http.post(f"/admin/skillpacks/{STABLE[step % 3]}/{op}")
                ok = r.status_code == 200
            res.admin_ops[op] = res.admin_ops.get(op, 0) + 1
            if not ok:
                res.errors.append(f"admin {op}: HTTP {r.status_code}: {r.text[:300]}")
            step += 1
            await asyncio.sleep(cfg.admin_every_s)


async def rss_loop(sample, deadline: float, every: float, res: LoadResult, t0: float) -> None:
    while time.monotonic() < deadline:
        res.rss.append((time.monotonic() - t0, sample()))
        await asyncio.sleep(every)


async def drive(url: str, pack_files: dict[str, bytes], cfg: LoadConfig, rss_sample) -> tuple[LoadResult, list]:
    """Run the clients, the admin churn and the RSS sampler until the deadline; returns the
    result and the greedy responses kept for checking."""
    res, checks = LoadResult(), []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        base_id = next(m["id"] for m in (await http.get("/v1/models")).json()["data"] if not m.get("parent"))
    t0 = time.monotonic()
    deadline = t0 + cfg.seconds
    await asyncio.gather(
        *[client_loop(i, url, base_id, cfg, deadline, res, checks) for i in range(cfg.clients)],
        admin_loop(url, pack_files, cfg, deadline, res),
        rss_loop(rss_sample, deadline, cfg.rss_every_s, res, t0),
    )
    res.seconds = time.monotonic() - t0
    return res, checks


def check_sample(res: LoadResult, checks: list, reference: Reference, atol: float = 1e-3) -> None:
    """Compare the sampled greedy responses with the merged-model reference."""
    for mix, prompt, max_tokens, text, logprobs in checks:
        want_text, want_lp = reference.greedy(mix, prompt, max_tokens)
        res.checked += 1
        close = len(logprobs) == len(want_lp) and all(abs(a - b) <= atol for a, b in zip(logprobs, want_lp))
        if text != want_text or not close:
            res.wrong.append(f"mix={mix} prompt={prompt}: got {text!r} {logprobs}, expected {want_text!r} {want_lp}")


def run_load(url: str, pack_paths: dict[str, Path], cfg: LoadConfig, rss_sample, reference: Reference) -> LoadResult:
    """Drive a server already serving the STABLE packs; the churn pack is managed here."""
    pack_files = {name: Path(p).read_bytes() for name, p in pack_paths.items()}
    res, checks = asyncio.run(drive(url, pack_files, cfg, rss_sample))
    check_sample(res, checks, reference)
    return res


def prepare_store(base: Path, folder: Path) -> dict[str, Path]:
    """A store folder holding the STABLE packs (built from seeded noise on `base`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: noise_pack(base, folder / f"{name}.skillpack", name, seed=100 + k)
            for k, name in enumerate(STABLE)}
