"""The whole thing on a real local Ray cluster: 2 CPU replicas of the tiny llama behind Ray Serve's proxy.

A one-node cluster on 127.0.0.1 (2 CPUs, no dashboard) runs the deployment with two
replicas over one shared pack folder; requests go over HTTP through Ray's proxy, with the
pack name in Ray's routing header. Checked:

- every answer (three packs, the base, a weighted mix, a pack uploaded through the
  cluster) equals the single-process server's answer to the same request;
- repeated requests for one pack go to the replica that loaded it (X-SkillPack-Replica).

Everything is bounded in time and the cluster is shut down by the fixture.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from skillpack_server.ray_serve import MULTIPLEX_HEADER, REPLICA_HEADER, build_application
from testbed.load import free_port
from tests.scale.conftest import PACK_SCALES
from tests.scale.test_replica_app import answer
from tests.server.test_api_common import ADMIN, settings_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's pydantic-v1 style models

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60
OBJECT_STORE_BYTES = 128 * 1024 * 1024  # requests and answers are small; Ray's default takes 30% of memory
ROUNDS = 3
PROMPT = "3 plus 4 is"
LOGPROB_ATOL = 1e-4  # rows batched together round differently (the engine's own tests use the same bound)


@pytest.fixture(scope="module")
def cluster(llama, stores):
    """Ray on loopback with the deployment running; yields the proxy's URL and the start-up seconds."""
    import ray
    from ray import serve as ray_serve
    from ray._private import ray_constants

    started = time.monotonic()
    env = {key: os.environ[key] for key in ("TRITON_INTERPRET", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    with pytest.MonkeyPatch.context() as patch:
        # Ray swaps 127.0.0.1 for the machine's routable address unless clusters are off (its
        # single-machine mode): keep every Ray service on loopback
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        patch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
                 runtime_env={"env_vars": env | {"PYTHONPATH": str(REPO)}})
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        port = free_port()
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = settings_for(llama, stores[0], scale={"replicas": 2, "num_cpus": 1, "rescan_seconds": 1})
        app = build_application(settings, cluster_gpus=0)
        ray_serve.run_many([ray_serve.RunTarget(app, name=settings.scale.app_name, route_prefix="/")],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        wait_until_running(ray_serve, settings.scale.app_name, started + START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}", time.monotonic() - started
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def wait_until_running(ray_serve, app_name: str, deadline: float) -> None:
    status = None
    while time.monotonic() < deadline:
        status = ray_serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            reasons = "; ".join(d.message for d in status.deployments.values() if d.message)
            pytest.fail(f"the Ray Serve application failed to deploy: {status.message} {reasons}")
        time.sleep(0.5)
    pytest.fail(f"the Ray Serve application was not running after {START_TIMEOUT_S} s: {status}")


def body(model: str, **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 1} | extra


def post(url: str, model: str, routing: str | None = None, **extra) -> httpx.Response:
    headers = {MULTIPLEX_HEADER: routing} if routing else {}
    response = httpx.post(f"{url}/v1/completions", json=body(model, **extra), headers=headers,
                          timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response


def test_replicas_answer_like_one_process_and_each_pack_sticks_to_its_replica(cluster, reference, pack_files):
    url, startup_s = cluster
    base = next(m["id"] for m in reference.get("/v1/models").json()["data"] if m.get("parent") is None)
    mix = [{"name": "skill", "weight": 0.5}, {"name": "skill2x", "weight": 0.25}]
    packs = ["skill", "skill2x"]

    # a pack uploaded through whichever replica the proxy picks is served by all
    with open(pack_files["unskill"], "rb") as f:
        uploaded = httpx.post(f"{url}/admin/skillpacks", headers=ADMIN, timeout=REQUEST_TIMEOUT_S,
                              files={"file": ("unskill.skillpack", f)})
    assert uploaded.status_code == 201, uploaded.text
    packs.append("unskill")
    assert set(packs) == set(PACK_SCALES)

    expected = {model: answer(reference.post("/v1/completions", json=body(model))) for model in [*packs, base]}
    expected["mix"] = answer(reference.post("/v1/completions", json=body(base, skillpacks=mix)))

    holder = {pack: post(url, pack, pack).headers[REPLICA_HEADER] for pack in packs}  # first use loads it
    time.sleep(1.0)  # replicas report what they hold every 0.1 s; let the proxy's router hear it
    served: dict[str, set[str]] = {pack: set() for pack in packs}
    for _ in range(ROUNDS):
        for pack in packs:
            response = post(url, pack, pack)
            served[pack].add(response.headers[REPLICA_HEADER])
            assert answer(response) == expected[pack]
        assert answer(post(url, base)) == expected[base]
        assert answer(post(url, base, skillpacks=mix)) == expected["mix"]
    assert served == {pack: {holder[pack]} for pack in packs}

    # a concurrent burst of mixed requests: any replica may answer, the answers must not change
    jobs = [(pack, pack) for pack in packs] * 2 + [(base, None)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: (job[0], post(url, job[0], job[1])), jobs))
    for model, response in results:  # batched with other rows: same tokens, logprobs to float rounding
        text, tokens, logprobs = answer(response)
        assert (text, tokens) == expected[model][:2]
        assert logprobs == pytest.approx(expected[model][2], abs=LOGPROB_ATOL)
    replicas = {r.headers[REPLICA_HEADER] for _, r in results}
    print(f"\nray cluster: started in {startup_s:.1f} s; pack -> replica {holder}; burst used {len(replicas)} "
          f"replica(s)")
