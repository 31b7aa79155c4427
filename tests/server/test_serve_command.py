"""`skillpack serve` as a user runs it: any supported checkpoint starts without extra flags, a
bad setting is one line and a non-zero exit, the admin token is generated once, kept 0600 and
printed last, and read-only pack folders (the demo packs) are never written."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from skillpack_server.settings import Settings
from skillpacks.cli import main
from testbed.load import free_port
from tests.server.test_api_common import ADMIN, build_pack, serve, settings_for, snapshot

REPO = Path(__file__).resolve().parents[2]
SKILLPACK = Path(sys.executable).parent / "skillpack"
READY = "SkillPack Server is ready on"


@pytest.fixture
def base256(llama, tmp_path):
    """The tiny llama base with a 256-token context, below the 2048 the settings once assumed."""
    folder = tmp_path / "base256"
    shutil.copytree(llama.base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 256}))
    return folder


def user_env(home: Path) -> dict[str, str]:
    """The environment of a user with no SKILLPACK_* settings and their own XDG folders."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLPACK_")}
    return env | {"XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
                  "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}


class Served:
    """`skillpack serve ARGS` in a subprocess, stdout and stderr together in one log, until ready."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.port = free_port()
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([str(SKILLPACK), "serve", "--port", str(self.port), *args], env=env,
                                         cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while READY not in self.output():
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{self.output()}"
            time.sleep(0.1)
        time.sleep(0.3)  # anything printed after the banner would show now
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


def test_a_short_context_checkpoint_serves_with_no_flags_and_keeps_its_admin_token(base256, tmp_path):
    env = user_env(tmp_path)
    token_file = tmp_path / "config" / "skillpack" / "admin_token"
    served = Served(["--base", str(base256)], env, tmp_path / "first.log")
    try:
        lines = served.output().strip().splitlines()
        banner = next(i for i, line in enumerate(lines) if READY in line)
        # the token is in the banner, and the banner is the last thing printed
        assert all(line.startswith("  ") for line in lines[banner + 1:]), lines[banner:]
        token = re.search(rf"admin token \(generated and saved in {re.escape(str(token_file))}\): (\S+)",
                          served.output()).group(1)
        assert token_file.read_text().strip() == token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
        with httpx.Client(base_url=served.url, timeout=60) as http:
            assert http.get("/admin/skillpacks").status_code == 401
            assert http.get("/admin/skillpacks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            # max_model_len is the checkpoint's own 256
            r = http.post("/v1/completions", json={"model": base256.name, "prompt": [5] * 300, "max_tokens": 1})
            assert r.status_code == 400 and "maximum context length is 256 tokens" in r.json()["error"]["message"]
            r = http.post("/v1/completions", json={"model": base256.name, "prompt": [5] * 250, "max_tokens": 2})
            assert r.status_code == 200, r.text
        assert (tmp_path / "data" / "skillpack" / "packs").is_dir()  # the default store, outside the repo
    finally:
        served.stop()
    again = Served(["--base", str(base256)], env, tmp_path / "second.log")
    try:
        assert f"admin token (read from {token_file}): {token}" in again.output()
    finally:
        again.stop()


def one_line_error(args: list[str], capsys) -> str:
    assert main(["serve", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


def test_a_bad_setting_exits_non_zero_with_one_line(base256, tmp_path):
    done = subprocess.run([str(SKILLPACK), "serve", "--base", str(base256), "--max-model-len", "4096"],
                          env=user_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "max_model_len=4096" in done.stderr and "max_position_embeddings=256" in done.stderr
    assert "--max-model-len or SKILLPACK_MAX_MODEL_LEN" in done.stderr


@pytest.mark.parametrize("args, says", [
    (["--max-batch", "0"], ["max_batch=0", "greater than or equal to 1", "--max-batch or SKILLPACK_MAX_BATCH"]),
    (["--port", "70000"], ["port=70000", "--port or SKILLPACK_PORT"]),
    (["--device", "nonsense"], ["device='nonsense'", "expected auto, cpu, cuda or cuda:N", "--device"]),
    (["--dtype", "int3"], ["dtype='int3'", "--dtype or SKILLPACK_DTYPE"]),
    (["--kv-budget-tokens", "100"], ["kv_budget_tokens=100", "max_model_len=256", "--kv-budget-tokens"]),
    (["--replicas", "2"], ["--replicas needs --ray"]),
    (["--admin-token", "short"], ["admin_token=<5 characters>", "at least 8 characters", "--admin-token or"]),
])
def test_each_bad_setting_is_named_with_its_flag(base256, tmp_path, capsys, args, says):
    err = one_line_error(["--base", str(base256), "--packs", str(tmp_path / "store"), *args], capsys)
    for phrase in says:
        assert phrase in err, err


def test_a_missing_or_unreadable_base_and_an_open_token_file_are_one_line(tmp_path, capsys, base256, monkeypatch):
    err = one_line_error(["--base", str(tmp_path / "nowhere"), "--packs", str(tmp_path / "s")], capsys)
    assert str(tmp_path / "nowhere") in err and "--base or SKILLPACK_BASE" in err
    token_file = tmp_path / "token"
    token_file.write_text("readable-by-all-123\n")
    token_file.chmod(0o644)
    monkeypatch.delenv("SKILLPACK_ADMIN_TOKEN", raising=False)
    err = one_line_error(["--base", str(base256), "--packs", str(tmp_path / "s"),
                          "--admin-token-file", str(token_file)], capsys)
    assert "mode 0644" in err and f"chmod 600 {token_file}" in err


def test_settings_defaults_live_in_the_users_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("SKILLPACK_READONLY_PACKS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    s = Settings()
    assert s.packs == tmp_path / "d" / "skillpack" / "packs"
    assert s.admin_token_file == tmp_path / "c" / "skillpack" / "admin_token"
    assert s.readonly_packs == [tmp_path / "a", tmp_path / "b"] and s.engine.max_model_len is None


def modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode for p in folder.iterdir()}


def git_status(path: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", str(path)], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


def upload(client, data: bytes, name: str, replace: bool = False):
    return client.post("/admin/skillpacks", files={"file": ("p.skillpack", data)},
                       data={"name": name, "replace": str(replace).lower()}, headers=ADMIN)


def test_uploads_leave_read_only_folders_and_the_checkout_as_they_were(llama, tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    build_pack(llama, readonly / "ro.skillpack", "ro")
    (readonly / "ro.examples.jsonl").write_text('{"prompt": "a question for ro"}\n')
    store = tmp_path / "store"
    store.mkdir()
    build_pack(llama, store / "ro.skillpack", "ro", scale=2.0)  # shadowed: the read-only one serves
    fresh = build_pack(llama, tmp_path / "fresh.skillpack", "fresh", scale=-1.0).read_bytes()
    demo = REPO / "packs"
    before = {folder: (snapshot(folder), modes(folder)) for folder in (readonly, demo)}
    demo_status = git_status(demo)
    demo_name = sorted(demo.glob("*.skillpack"))[0].stem

    with serve(settings_for(llama, store, readonly_packs=[demo, readonly])) as client:
        info = client.get("/admin/skillpacks/ro", headers=ADMIN).json()
        assert info["status"]["path"] == str(readonly / "ro.skillpack")
        assert "ro" in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert client.get("/admin/skillpacks/ro/examples", headers=ADMIN).text.startswith('{"prompt"')
        for name in ("ro", demo_name):  # a read-only name is never taken, replace or not
            for replace in (False, True):
                r = upload(client, fresh, name, replace)
                assert r.status_code == 409 and r.json()["error"]["code"] == "pack_read_only", r.text
                assert str(r.json()["error"]["message"]).startswith(f"The pack `{name}` is served read-only")
        assert client.delete("/admin/skillpacks/ro", headers=ADMIN).status_code == 409
        r = client.put("/admin/skillpacks/ro/examples", content=b'{"prompt": "x"}\n', headers=ADMIN)
        assert r.status_code == 409
        assert client.delete("/admin/skillpacks/ro/examples", headers=ADMIN).status_code == 409

        assert upload(client, fresh, "fresh").status_code == 201
        assert stat.S_IMODE((store / "fresh.skillpack").stat().st_mode) == 0o644  # readable, as a copied file
        assert upload(client, fresh, "fresh").status_code == 409
        assert upload(client, fresh, "fresh", replace=True).json()["replaced"] is True
        assert client.delete("/admin/skillpacks/fresh", headers=ADMIN).status_code == 200

    assert {folder: (snapshot(folder), modes(folder)) for folder in (readonly, demo)} == before
    assert git_status(demo) == demo_status
    assert sorted(snapshot(store)) == ["ro.skillpack"]  # skipped at start, left alone
