"""The model runtime against transformers' own forward: base logits, and pack rows against
the merged model (base weights + the pack's dense delta) built here from `delta.dense()`.

The helpers at the top (pack building, merged models) are shared by the engine tests.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from skillpack_server.model.batch import SeqChunk, build_step
from skillpack_server.model.config import ModelConfig
from skillpack_server.model.kv_cache import PagedKVCache
from skillpack_server.model.loader import load_model
from skillpack_server.model.pack_slots import PackSlots
from skillpack_server.model.rope import rope_inv_freq
from skillpacks.checkpoint import open_checkpoint
from skillpacks.compress import Recipe, compress_with_recipe, delta_svd, lowrank_delta, lowrank_stats
from skillpacks.deltas import ExactDelta, ModuleRecord
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import write_pack
from skillpacks.module_kinds import module_kind
from testbed.tiny_models import build_tiny_pair

ATOL = 2e-4  # fp32 logits of a 2-layer model: the runtime and transformers differ by ~1e-6


# ---- shared helpers ------------------------------------------------------------------

def tuned_delta(base_dir: Path, tuned_dir: Path) -> dict[str, torch.Tensor]:
    """Dense float32 tuned − base for every tensor of the base checkpoint."""
    base, tuned = open_checkpoint(base_dir), open_checkpoint(tuned_dir)
    return {n: tuned.get(n).float() - base.get(n).float() for n in base.names()}


def noise_delta(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A seeded delta with the same shapes and norms as `like`: rank-4 for matrices."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in like.items():
        if d.dim() == 2:
            noise = torch.randn(d.shape[0], 4, generator=g) @ torch.randn(4, d.shape[1], generator=g)
        else:
            noise = torch.randn(d.shape, generator=g)
        out[name] = noise * (d.norm() / noise.norm().clamp_min(1e-12))
    return out


def compress_deltas(dense: dict[str, torch.Tensor], lowrank_vocab: bool = False) -> tuple[dict, list[ModuleRecord]]:
    """Each module compressed by its kind with the graftllm recipe (sparse embedding/lm_head), or
    with `lowrank_vocab` the embedding/lm_head stored low-rank (8 and 4 bits) as budget builds do."""
    deltas, records = {}, []
    for name, d in dense.items():
        kind = module_kind(name)
        if lowrank_vocab and kind in ("embedding", "lm_head"):
            u, s, vh = delta_svd(d)
            delta = lowrank_delta(u, s, vh, [(8, 6), (4, 10)], 32, clip=True)
            stats = lowrank_stats(d, s, delta, 32)
        else:
            delta, stats = compress_with_recipe(kind, d, Recipe())
        deltas[name] = delta
        method = {"LowRankDelta": "lowrank", "SparseDelta": "sparse", "ExactDelta": "exact"}[type(delta).__name__]
        records.append(ModuleRecord(name, kind, method, list(d.shape), stats))
    return deltas, records


def write_test_pack(path: Path, name: str, base_dir: Path, dense: dict[str, torch.Tensor],
                    base_fp: dict | None = None) -> Path:
    deltas, records = compress_deltas(dense)
    fp = base_fp or base_fingerprint(open_checkpoint(base_dir))
    write_pack(path, name, f"test pack {name}", fp, deltas, records, build={})
    return path


def merged_model(base_dir: Path, mix: list[tuple[dict, float]]):
    """transformers' model with base weights + Σ weight · delta.dense() (the oracle)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for deltas, weight in mix:
            for name, delta in deltas.items():
                model.get_parameter(name).add_(weight * delta.dense(torch.float32))
    return model


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# ---- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime_of():
    cache = {}

    def get(pair):
        if pair.arch not in cache:
            cache[pair.arch] = load_model(pair.base, "cpu", torch.float32)
        return cache[pair.arch]

    return get


PROMPTS = [[5, 17, 99, 3, 250, 11, 7, 42, 8], [8, 9, 10], [300, 2, 77, 77, 120, 64]]


def run_chunks(model, kv, prompts, packs, split: int):
    """Prefill every prompt in two steps (first `split` tokens, then the rest), all rows
    batched together; returns each prompt's logits for every position."""
    pages = [kv.allocator.allocate(kv.pages_for(len(p))) for p in prompts]
    out = [[] for _ in prompts]
    for lo, hi in ((0, split), (split, None)):
        chunks, owners = [], []
        for i, p in enumerate(prompts):
            part = p[lo:hi]
            if part:
                chunks.append(SeqChunk(part, lo, pages[i], list(range(len(part))), packs[i]))
                owners.append((i, len(part)))
        device = kv.k[0].device
        logits = model(build_step(chunks, kv.page_size, max(model.num_pack_slots, 1), device), kv)
        row = 0
        for i, n in owners:
            out[i].append(logits[row : row + n])
            row += n
    for p in pages:
        kv.allocator.free(p)
    return [torch.cat(o) for o in out]


# ---- tests -----------------------------------------------------------------------------

def test_base_logits_match_transformers(tiny_pair, runtime_of):
    model = runtime_of(tiny_pair)
    kv = PagedKVCache(model.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_pair.base, dtype=torch.float32).eval()
    got = run_chunks(model, kv, PROMPTS, [[]] * len(PROMPTS), split=5)
    for ids, logits in zip(PROMPTS, got):
        torch.testing.assert_close(logits, reference_logits(hf, ids), atol=ATOL, rtol=0)


def check_pack_rows(pair, model, device, atol):
    """One batch: a base row, a row per pack and a fused row, each equal to its merged model.
    The two packs store the embedding/lm_head delta differently (sparse, low-rank)."""
    kv = PagedKVCache(model.config, num_pages=16, page_size=4, device=device, dtype=model.model.norm.weight.dtype)
    slots = PackSlots(model, num_slots=4)
    dense = tuned_delta(pair.base, pair.tuned)
    skill, _ = compress_deltas(dense)
    noise, _ = compress_deltas(noise_delta(dense, seed=3), lowrank_vocab=True)
    assert any(type(d).__name__ == "LowRankDelta" for n, d in noise.items() if "embed" in n or "lm_head" in n)
    slots.load(1, skill)
    slots.load(3, noise)
    rows = [[], [(1, 1.0)], [(3, 1.0)], [(1, 0.6), (3, 0.4)]]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    got = [g.cpu() for g in run_chunks(model, kv, prompts, rows, split=4)]
    oracles = [[], [(skill, 1.0)], [(noise, 1.0)], [(skill, 0.6), (noise, 0.4)]]
    for ids, logits, mix in zip(prompts, got, oracles):
        torch.testing.assert_close(logits, reference_logits(merged_model(pair.base, mix), ids), atol=atol, rtol=0)
    # the pack really changes the output: a check that could not pass if deltas were ignored
    assert (got[0] - got[1]).abs().max() > 100 * atol


def test_pack_rows_match_merged_models(tiny_pair, runtime_of):
    check_pack_rows(tiny_pair, runtime_of(tiny_pair), "cpu", ATOL)


@pytest.mark.gpu
def test_pack_rows_match_merged_models_on_cuda(tiny_pair):
    """The same batch on CUDA in fp32: the Triton kernels' TF32 dots allow a looser bound."""
    check_pack_rows(tiny_pair, load_model(tiny_pair.base, "cuda", torch.float32), "cuda", 2e-3)


def test_cleared_slot_leaves_base_model(tiny_root, tiny_tokenizer, runtime_of):
    pair = build_tiny_pair("qwen2", tiny_root, tiny_tokenizer)
    model = runtime_of(pair)
    kv = PagedKVCache(model.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    slots = PackSlots(model, num_slots=2)
    skill, _ = compress_deltas(tuned_delta(pair.base, pair.tuned))
    slots.load(0, skill)
    slots.clear(0)
    got = run_chunks(model, kv, PROMPTS[:1], [[]], split=3)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    torch.testing.assert_close(got, reference_logits(hf, PROMPTS[0]), atol=ATOL, rtol=0)


def test_sliding_window_matches_transformers(tiny_root, tiny_tokenizer, tmp_path):
    pair = build_tiny_pair("mistral", tiny_root, tiny_tokenizer)
    folder = tmp_path / "mistral-window"
    shutil.copytree(pair.base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder, "cpu", torch.float32)
    assert model.config.sliding_window == 4
    kv = PagedKVCache(model.config, num_pages=8, page_size=4, device="cpu", dtype=torch.float32)
    got = run_chunks(model, kv, PROMPTS[:1], [[]], split=5)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = reference_logits(hf, PROMPTS[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    full = reference_logits(transformers.AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32), PROMPTS[0])
    assert (want[-1] - full[-1]).abs().max() > 100 * ATOL  # the window really matters here


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=dict(rope),
                                      max_position_embeddings=512)
    ours = ModelConfig.from_dict(hf_cfg.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(ours), want.float(), atol=0, rtol=1e-6)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path, "cpu", torch.float32)


def test_unsupported_rope_type_is_refused():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
    cfg |= {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        ModelConfig.from_dict(cfg)


def test_pack_slots_refuse_foreign_deltas(tiny_root, tiny_tokenizer, runtime_of):
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    slots = PackSlots(runtime_of(pair), num_slots=1)
    with pytest.raises(ValueError, match="'lm_head.weight'.*does not have"):
        slots.load(0, {"lm_head.weight": ExactDelta(torch.zeros(384, 64))})  # tied base: no lm_head
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(32,\).*\(64,\)"):
        slots.load(0, {"model.norm.weight": ExactDelta(torch.zeros(32))})
    with pytest.raises(ValueError, match="q_proj.weight.*ExactDelta.*LowRankDelta"):
        slots.load(0, {"model.layers.0.self_attn.q_proj.weight": ExactDelta(torch.zeros(64, 64))})


def test_vocab_deltas_gather_and_product_match_dense():
    """Both device forms of an embedding/lm_head delta (CSR, low-rank factors) against the dense ΔE."""
    from skillpack_server.model.vocab_delta import LowRankRows, to_vocab_delta
    from skillpacks.compress import delta_svd, lowrank_delta
    from skillpacks.deltas import SparseDelta

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(40, 24, generator=g) * (torch.rand(40, 24, generator=g) < 0.15)
    dense[7] = 0  # an empty row
    flat = dense.flatten().nonzero().squeeze(1)
    sparse = SparseDelta(flat.int(), dense.flatten()[flat].half(), (40, 24))
    dense = sparse.dense()
    ids = torch.tensor([7, 3, 3, 39, 0, 12])
    h = torch.randn(5, 24, generator=g)
    for delta in (sparse, ExactDelta(dense)):
        rows = to_vocab_delta(delta, "cpu")
        torch.testing.assert_close(rows.gather(ids), dense[ids], atol=0, rtol=0)
        torch.testing.assert_close(rows.times_transposed(h), h @ dense.T, atol=1e-5, rtol=0)
    # low-rank: the oracle is the dense B diag(s) A of the stored (quantized) factors
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 24, generator=g)
    u, s, vh = delta_svd(low)
    lr = lowrank_delta(u, s, vh, [(8, 2), (4, 1)], 8)
    rows = to_vocab_delta(lr, "cpu")
    assert isinstance(rows, LowRankRows) and rows.left_t.shape == (3, 40) and rows.right.shape == (3, 24)
    ref = lr.dense(torch.float64)
    torch.testing.assert_close(rows.gather(ids).double(), ref[ids], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.times_transposed(h).double(), h.double() @ ref.T, atol=1e-4, rtol=1e-5)
    assert rows.nbytes == (40 + 24) * 3 * 4


def test_a_pack_without_some_modules_mixes_with_packs_that_have_them(tiny_root, tiny_tokenizer, runtime_of):
    """Budget builds drop modules: a batch that mixes such a pack with a complete one must
    apply, per linear, only the packs that hold a delta for it."""
    pair = build_tiny_pair("llama", tiny_root, tiny_tokenizer)
    model = runtime_of(pair)
    kv = PagedKVCache(model.config, num_pages=16, page_size=4, device="cpu", dtype=torch.float32)
    slots = PackSlots(model, num_slots=2)
    dense = tuned_delta(pair.base, pair.tuned)
    full, _ = compress_deltas(dense)
    partial = {n: d for n, d in compress_deltas(noise_delta(dense, seed=5))[0].items()
               if "q_proj" not in n and "layers.1.mlp" not in n}
    slots.load(0, full)
    slots.load(1, partial)
    rows = [[(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, 0.5)]]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    got = run_chunks(model, kv, prompts, rows, split=4)
    oracles = [[(full, 1.0)], [(partial, 1.0)], [(full, 0.5), (partial, 0.5)]]
    for ids, logits, mix in zip(prompts, got, oracles):
        torch.testing.assert_close(logits, reference_logits(merged_model(pair.base, mix), ids), atol=ATOL, rtol=0)
