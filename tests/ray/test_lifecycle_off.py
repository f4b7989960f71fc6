"""A Ray fleet loads every model on every replica and keeps it: the model lifecycle's
settings (preload, max_loaded_models, keep_alive_s) do not reach the replicas or the
ingress's own engine, which would otherwise unload models the router places requests on."""

from __future__ import annotations

import attrs

import erllama
from erllama.ray.fleet import tokenizer_config
from erllama.ray.replica import replica_engine_config

from ..helpers import stub_config


def test_a_fleets_engines_load_every_model_and_keep_it() -> None:
    config = erllama.EngineConfig(
        models={
            "a": attrs.evolve(stub_config(), keep_alive_s=30),
            "b": attrs.evolve(stub_config(), keep_alive_s=0),
        },
        preload=["a"],
        max_loaded_models=1,
    )
    for engine_config in (replica_engine_config(config, "replica-0"), tokenizer_config(config)):
        assert engine_config.preload is None and engine_config.max_loaded_models is None
        assert sorted(engine_config.models) == ["a", "b"]
        assert all(m.keep_alive_s is None for m in engine_config.models.values())
