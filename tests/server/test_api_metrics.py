"""`GET /health` and `GET /metrics`: the counters move with the traffic the tests send."""
import re


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{labels} is not in /metrics"
    return float(match.group(1))


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == client.app.state.engine.model_id and body["packs"] == 2


def test_metrics_follow_requests(client):
    before = client.get("/metrics").text
    r = client.post("/v1/completions", json={"model": "skill", "prompt": "1 plus 2 is", "max_tokens": 3})
    usage = r.json()["usage"]
    client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
    after = client.get("/metrics").text
    route_ok = '{route="/v1/completions",status="200"}'
    previous = sample(before, "skillpack_http_requests_total", route_ok) if route_ok in before else 0
    assert sample(after, "skillpack_http_requests_total", route_ok) == previous + 1
    assert sample(after, "skillpack_http_requests_total", '{route="/v1/completions",status="404"}') >= 1
    grew = sample(after, "skillpack_generation_tokens_total") - sample(before, "skillpack_generation_tokens_total")
    assert grew == usage["completion_tokens"]
    grew = sample(after, "skillpack_prompt_tokens_total") - sample(before, "skillpack_prompt_tokens_total")
    assert grew == usage["prompt_tokens"]
    assert sample(after, "skillpack_e2e_request_latency_seconds_count", '{route="/v1/completions"}') >= 1
    assert sample(after, "skillpack_time_to_first_token_seconds_count", '{route="/v1/completions"}') >= 1
    for name in ("skillpack_queue_depth", "skillpack_pack_cache_hits_total", "skillpack_pack_cache_misses_total",
                 "skillpack_pack_cache_loads_total", "skillpack_pack_cache_evictions_total"):
        assert sample(after, name) >= 0
    assert re.search(r"^skillpack_lora_requests_info\{.*running_lora_adapters=.*waiting_lora_adapters=.*\} ",
                     after, re.M)
    assert sample(after, "skillpack_packs_registered") == 2
