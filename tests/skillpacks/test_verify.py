"""Verification rejects every kind of broken or hostile pack with a sentence that says why."""
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from skillpacks.checkpoint import open_checkpoint, read_header
from skillpacks.cli import main as cli_main
from skillpacks.fingerprint import base_fingerprint
from skillpacks.format import PackError, read_manifest, verify_pack
from tests.skillpacks.test_format import make_test_pack

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good_pack(tiny_pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "good.skillpack"
    make_test_pack(tiny_pairs["qwen2"], path)
    return path


def raw_header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8: 8 + n]), data[8 + n:]


def write_raw(path, header: dict, payload: bytes, pad=True):
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def rewrite(src, dst, edit_tensors=None, edit_manifest=None):
    """Re-save a pack with edited tensors/manifest and a *correct* checksum, so only the
    edited fault remains for verify to find."""
    tensors = load_file(str(src))
    manifest = read_manifest(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    save_file(tensors, str(dst), metadata={"skillpack": json.dumps(manifest)})
    header, payload = raw_header(dst)
    manifest["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    save_file(tensors, str(dst), metadata={"skillpack": json.dumps(manifest)})
    return dst


def test_good_pack_verifies(good_pack):
    assert verify_pack(good_pack)["name"] == "skill"


def test_rewrite_helper_alone_keeps_a_pack_valid(good_pack, tmp_path):
    assert verify_pack(rewrite(good_pack, tmp_path / "same.skillpack"))["name"] == "skill"


def test_flipped_payload_byte_fails_the_checksum(good_pack, tmp_path):
    data = bytearray(good_pack.read_bytes())
    data[-100] ^= 0x01
    bad = tmp_path / "flip.skillpack"
    bad.write_bytes(bytes(data))
    with pytest.raises(PackError, match="checksum mismatch"):
        verify_pack(bad)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(good_pack, tmp_path, keep):
    data = good_pack.read_bytes()
    bad = tmp_path / "trunc.skillpack"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:-3])
    with pytest.raises(PackError, match="truncated"):
        verify_pack(bad)


def test_header_length_above_the_limit(tmp_path):
    bad = tmp_path / "huge.skillpack"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b"{}" * 10)
    with pytest.raises(PackError, match="the limit is"):
        verify_pack(bad)


def _edit_entry(good_pack, tmp_path, edit):
    header, payload = raw_header(good_pack)
    edit(header)
    bad = tmp_path / "bad.skillpack"
    write_raw(bad, header, payload)
    return bad


def test_offsets_past_the_end(good_pack, tmp_path):
    def edit(h):
        n = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        h[f"{Q}:s"]["data_offsets"] = [n, n + 4 * h[f"{Q}:s"]["shape"][0]]
    with pytest.raises(PackError, match="truncated or its header is corrupt"):
        verify_pack(_edit_entry(good_pack, tmp_path, edit))


def test_overlapping_offsets(good_pack, tmp_path):
    def edit(h):
        entries = sorted((e["data_offsets"][0], k) for k, e in h.items() if k != "__metadata__")
        first, second = h[entries[0][1]], h[entries[1][1]]
        # second tensor claims a span starting inside the first, same length
        span = second["data_offsets"][1] - second["data_offsets"][0]
        second["data_offsets"] = [first["data_offsets"][0] + 1, first["data_offsets"][0] + 1 + span]
    with pytest.raises(PackError, match="overlaps|gap"):
        verify_pack(_edit_entry(good_pack, tmp_path, edit))


def test_dtype_times_shape_must_match_the_span(good_pack, tmp_path):
    def edit(h):
        h[f"{Q}:s"]["shape"] = [h[f"{Q}:s"]["shape"][0] * 1000]
    with pytest.raises(PackError, match="needs"):
        verify_pack(_edit_entry(good_pack, tmp_path, edit))


@pytest.mark.parametrize("text,match", [
    (b"not json at all!", "not valid UTF-8 JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid UTF-8 JSON"),
    (b"[1, 2]", "expected an object"),
    (b'{"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 1]}}', "dtype 'F99'"),
    (b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', "non-negative"),
    (b'{"__metadata__": {"a": 1}}', "strings to strings"),
])
def test_malformed_headers(tmp_path, text, match):
    bad = tmp_path / "bad.skillpack"
    bad.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(PackError, match=match):
        verify_pack(bad)


def test_plain_safetensors_file_is_not_a_pack(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(PackError, match="without a SkillPack manifest"):
        verify_pack(path)


def test_manifest_that_is_not_json(good_pack, tmp_path):
    header, payload = raw_header(good_pack)
    header["__metadata__"]["skillpack"] = "{oops"
    bad = tmp_path / "bad.skillpack"
    write_raw(bad, header, payload)
    with pytest.raises(PackError, match="manifest is not valid JSON"):
        verify_pack(bad)


def test_non_finite_values_are_refused(good_pack, tmp_path):
    def nan_s(t):
        t[f"{Q}:s"][1] = float("nan")

    def inf_scale(t):
        t[f"{Q}:A.0.scales"][0, 0] = float("inf")

    def inf_sparse(t):
        t["model.embed_tokens.weight:values"][3] = float("inf")

    def nan_exact(t):
        t["model.norm.weight:delta"][0] = float("nan")

    for edit, match in [(nan_s, "singular values hold non-finite"), (inf_scale, "'scales' holds non-finite"),
                        (inf_sparse, "non-finite sparse"), (nan_exact, "non-finite delta")]:
        with pytest.raises(PackError, match=match):
            verify_pack(rewrite(good_pack, tmp_path / "bad.skillpack", edit_tensors=edit))


def test_unknown_format_version(good_pack, tmp_path):
    bad = rewrite(good_pack, tmp_path / "v2.skillpack", edit_manifest=lambda m: m.update(format_version=2))
    with pytest.raises(PackError, match="format version 2 is not supported"):
        verify_pack(bad)


def test_missing_and_extra_tensors(good_pack, tmp_path):
    with pytest.raises(PackError, match=f"'{Q}:B.1.zeros' is missing"):
        verify_pack(rewrite(good_pack, tmp_path / "a.skillpack", edit_tensors=lambda t: t.pop(f"{Q}:B.1.zeros")))
    extra = lambda t: t.update({"stowaway": torch.zeros(2)})  # noqa: E731
    with pytest.raises(PackError, match="'stowaway' belongs to no module"):
        verify_pack(rewrite(good_pack, tmp_path / "b.skillpack", edit_tensors=extra))


def _module(m, name):
    return next(x for x in m["modules"] if x["name"] == name)


def test_layout_inconsistencies(good_pack, tmp_path):
    def bits(m):
        _module(m, Q)["layout"]["tiers"][0]["bits"] = 4

    def tier_ranks(m):
        _module(m, Q)["layout"]["tiers"][0]["rank"] += 1

    def rank_too_big(m):
        lay = _module(m, Q)["layout"]
        lay["rank"] = 1000
        lay["tiers"][0]["rank"] = 1000 - lay["tiers"][1]["rank"]

    def odd_group(m):
        _module(m, Q)["layout"]["tiers"][0]["group_size"] = 12

    def bad_shape(m):
        _module(m, Q)["shape"] = [64, 65]

    def unknown_method(m):
        _module(m, Q)["method"] = "magic"

    def nnz_too_big(m):
        _module(m, "model.embed_tokens.weight")["layout"]["nnz"] = 10**9

    cases = [(bits, "layout implies"), (tier_ranks, "tiers hold"), (rank_too_big, "rank 1000"),
             (odd_group, "power of two"), (bad_shape, "base tensor has shape"), (unknown_method, "'magic'"),
             (nnz_too_big, "nnz=1000000000")]
    for edit, match in cases:
        with pytest.raises(PackError, match=match):
            verify_pack(rewrite(good_pack, tmp_path / "bad.skillpack", edit_manifest=edit))


def test_tier_part_shapes_must_agree(good_pack, tmp_path):
    def shrink(t):
        t[f"{Q}:A.0.scales"] = t[f"{Q}:A.0.scales"][:-1]
    with pytest.raises(PackError, match=f"'{Q}:A.0.scales' is F16"):
        verify_pack(rewrite(good_pack, tmp_path / "bad.skillpack", edit_tensors=shrink))


def test_sparse_indices_must_ascend_and_stay_in_range(good_pack, tmp_path):
    name = "model.embed_tokens.weight:indices"

    def swap(t):
        t[name][[0, 1]] = t[name][[1, 0]]

    def out_of_range(t):
        t[name][-1] = 10**9
    with pytest.raises(PackError, match="not strictly ascending"):
        verify_pack(rewrite(good_pack, tmp_path / "a.skillpack", edit_tensors=swap))
    with pytest.raises(PackError, match="outside"):
        verify_pack(rewrite(good_pack, tmp_path / "b.skillpack", edit_tensors=out_of_range))


def test_pack_for_another_base(tiny_pairs, tmp_path):
    pack = tmp_path / "untied.skillpack"
    make_test_pack(tiny_pairs["llama_untied"], pack)
    # mistral's tiny base has the very same weights and shapes, but another architecture
    mistral_fp = base_fingerprint(open_checkpoint(tiny_pairs["mistral"].base))
    with pytest.raises(PackError, match="architecture 'LlamaForCausalLM' but the base is 'MistralForCausalLM'"):
        verify_pack(pack, mistral_fp)
    tuned_fp = base_fingerprint(open_checkpoint(tiny_pairs["llama_untied"].tuned))
    with pytest.raises(PackError, match="weights differ"):
        verify_pack(pack, tuned_fp)
    tied_fp = base_fingerprint(open_checkpoint(tiny_pairs["llama"].base))
    with pytest.raises(PackError, match="tie_word_embeddings"):
        verify_pack(pack, tied_fp)


def test_cli_verify_exit_codes(good_pack, tiny_pairs, tmp_path, capsys):
    assert cli_main(["verify", str(good_pack), "--base", str(tiny_pairs["qwen2"].base)]) == 0
    assert "ok: pack 'skill'" in capsys.readouterr().out
    assert cli_main(["verify", str(good_pack), "--base", str(tiny_pairs["mistral"].base)]) == 1
    assert "Qwen2ForCausalLM" in capsys.readouterr().err
    data = bytearray(good_pack.read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "bad.skillpack").write_bytes(bytes(data))
    assert cli_main(["verify", str(tmp_path / "bad.skillpack")]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli_main(["verify", str(tmp_path / "missing.skillpack")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_inspect(good_pack, capsys):
    assert cli_main(["inspect", str(good_pack)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "skill" and "tensors" not in shown["base"]
    assert cli_main(["inspect", str(good_pack), "--modules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(shown["modules"]) and any(Q in line and "lowrank" in line for line in lines)


def test_header_is_read_without_reading_the_payload(good_pack, tmp_path):
    # a file whose payload is replaced by zeros still yields its manifest and tensor table
    header, payload = raw_header(good_pack)
    hollow = tmp_path / "hollow.skillpack"
    write_raw(hollow, header, bytes(len(payload)), pad=False)
    assert read_manifest(hollow)["name"] == "skill"
    assert set(read_header(hollow).tensors) == set(read_header(good_pack).tensors)
