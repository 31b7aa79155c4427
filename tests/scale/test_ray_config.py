"""The Ray Serve deployment's configuration, checked by Ray's own validation (no cluster needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from skillpack_server.ray_serve import (
    DEPLOYMENT_NAME, app_builder, deployment_options, packs_named_in, replica_deployment,
    replica_gpus, replica_settings, shared_store_of,
)
from skillpack_server.settings import ScaleSettings, Settings

# Ray's own config models still use pydantic-v1 style Field extras
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


def settings(**overrides) -> Settings:
    return Settings(**({"admin_token": "admin-token-for-tests", "max_batch": 8} | overrides))


def ray_config(options: dict):
    """The deployment config Ray itself builds from our options (it validates every field)."""
    return replica_deployment().options(**options)._deployment_config


def test_default_is_autoscaling_around_one_full_batch_per_replica():
    options = deployment_options(settings(), cluster_gpus=0)
    config = ray_config(options)
    assert options["name"] == DEPLOYMENT_NAME
    assert config.max_ongoing_requests == 16  # a running batch of 8 and one waiting
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 4)
    assert config.autoscaling_config.target_ongoing_requests == 8


def test_explicit_autoscaling_bounds_and_targets_reach_ray():
    scale = {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 5, "max_ongoing_requests": 12}
    config = ray_config(deployment_options(settings(scale=scale), cluster_gpus=0))
    auto = config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 6, 5)
    assert config.max_ongoing_requests == 12


def test_a_fixed_replica_count_turns_autoscaling_off():
    options = deployment_options(settings(scale={"replicas": 3}), cluster_gpus=0)
    config = ray_config(options)
    assert config.num_replicas == 3 and config.autoscaling_config is None


@pytest.mark.parametrize("device, cluster_gpus, expected", [
    ("cpu", 8, 0), ("auto", 0, 0), ("auto", 2, 1), ("cuda", 0, 1), ("cuda:3", 4, 1),
])
def test_one_device_per_replica_when_it_runs_on_cuda(device, cluster_gpus, expected):
    s = settings(device=device)
    assert replica_gpus(s, cluster_gpus) == expected
    options = deployment_options(s, cluster_gpus)
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": expected}
    shared = settings(device=device, scale={"num_gpus": 0.5})
    assert replica_gpus(shared, cluster_gpus) == 0.5  # an explicit share wins


@pytest.mark.parametrize("device, gpus, expected", [("auto", 1, "cuda"), ("cuda:3", 1, "cuda"),
                                                    ("auto", 0, "cpu"), ("cpu", 0, "cpu")])
def test_a_replica_uses_the_device_ray_gave_it_and_its_own_mirror(device, gpus, expected, tmp_path):
    s = replica_settings(settings(device=device, packs=Path("shared")), gpus, tmp_path)
    assert (s.engine.device, s.packs) == (expected, tmp_path)


def test_bad_scale_settings_are_refused_by_name():
    with pytest.raises(ValidationError, match="min_replicas=5 is above max_replicas=2"):
        ScaleSettings(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError, match="target_ongoing_requests=40.0 is above max_ongoing_requests=16"):
        deployment_options(settings(scale={"target_ongoing_requests": 40}), cluster_gpus=0)
    with pytest.raises(ValidationError, match="replicas"):
        ScaleSettings(replicas=0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['replica_count'\]"):
        app_builder({"replica_count": 2})


def test_scale_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("SKILLPACK_RAY_MAX_REPLICAS", "9")
    monkeypatch.setenv("SKILLPACK_RAY_SHARED_STORE", "s3://bucket/packs")
    s = settings()
    assert s.scale.max_replicas == 9
    assert shared_store_of(s) == "s3://bucket/packs"


def test_a_local_shared_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shared_store_of(settings(packs=Path("packs"))) == str(tmp_path / "packs")


@pytest.mark.parametrize("body, expected", [
    (b'{"model": "sql", "prompt": "x"}', ["sql"]),
    (b'{"model": "base", "skillpacks": [{"name": "a", "weight": 0.5}, {"name": "b"}]}', ["base", "a", "b"]),
    (b'{"model": 3, "skillpacks": "a"}', []),
    (b'[1, 2]', []),
    (b'{"model": "sq', []),
    (b'', []),
    (b'\xff\xfe', []),
])
def test_pack_names_are_read_from_request_bodies(body, expected):
    assert packs_named_in(body) == expected
