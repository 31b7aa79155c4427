"""`GET /v1/models` and pack selection: `model` = pack name, the `skillpacks` mix and its bounds."""
import pytest

PROMPT = "3 plus 4 is"


@pytest.fixture(scope="module")
def base_id(client):
    return client.app.state.engine.model_id


def greedy(client, **body):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_models_lists_the_base_and_every_pack_with_its_parent(client, base_id):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    assert set(cards) == {base_id, "skill", "skill2x"}  # no router nor example prompts: no `auto`
    assert cards[base_id]["parent"] is None
    for name in ("skill", "skill2x"):
        assert cards[name]["parent"] == base_id and cards[name]["object"] == "model" and cards[name]["owned_by"]


def test_model_by_id(client, base_id):
    assert client.get(f"/v1/models/{base_id}").json()["id"] == base_id
    assert client.get("/v1/models/skill").json()["parent"] == base_id
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `nope` does not exist."


def test_a_pack_changes_the_output_and_a_mix_of_one_equals_naming_it(client, base_id):
    base = greedy(client, model=base_id)
    skill = greedy(client, model="skill")
    assert skill != base
    assert greedy(client, model=base_id, skillpacks=[{"name": "skill", "weight": 1.0}]) == skill
    assert greedy(client, model=base_id, skillpacks=[{"name": "skill", "weight": 0.0}]) == base


@pytest.mark.parametrize("mix, param", [
    ([{"name": "skill", "weight": 4.5}], "skillpacks.0.weight"),
    ([{"name": "skill", "weight": -5}], "skillpacks.0.weight"),
    ([{"name": "skill", "weight": "inf"}], "skillpacks.0.weight"),
    ([{"name": f"p{i}"} for i in range(9)], "skillpacks"),
    ([{"name": "skill"}, {"name": "skill"}], "skillpacks"),
    ([], "skillpacks"),
    ([{"weight": 1}], "skillpacks.0.name"),
])
def test_bad_mixes_are_refused(client, base_id, mix, param):
    r = client.post("/v1/completions", json={"model": base_id, "prompt": PROMPT, "skillpacks": mix})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_pack_in_a_mix_is_a_404(client, base_id):
    r = client.post("/v1/completions", json={"model": base_id, "prompt": PROMPT,
                                             "skillpacks": [{"name": "skill"}, {"name": "ghost"}]})
    assert r.status_code == 404 and "`ghost`" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "skillpacks.1.name"


def test_a_mix_needs_the_base_as_model(client):
    r = client.post("/v1/completions", json={"model": "skill", "prompt": PROMPT, "skillpacks": [{"name": "skill2x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
