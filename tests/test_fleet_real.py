"""The fleet on the real model: the demo model (SmolLM2-135M-Instruct) and a second id of it in one server,
each on its own generation thread. Concurrent greedy streams to both give each the text a single-model server
gives, and `macprovider unload` gives the loaded model's memory back."""

from __future__ import annotations

import concurrent.futures
import shutil

import httpx
import pytest

from macprovider.models.hub_cache import install_in_hub_cache
from tests.test_e2e_serve import ServeProcess

PROMPTS = ("What is the capital of France?", "Name a primary color.")


def greedy(server: ServeProcess, model: str, prompt: str) -> str:
    chunks = list(
        server.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0, stream=True
        )
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.fixture(scope="module")
def second_id(real_model, real_model_dir, hf_home, tmp_path_factory) -> str:
    source = tmp_path_factory.mktemp("real-second")
    for path in real_model_dir.iterdir():
        shutil.copyfile(path.resolve(), source / path.name)
    install_in_hub_cache(source, real_model + "-second", hf_home / "hub")
    return real_model + "-second"


def test_two_real_models_in_one_server_answer_as_a_single_model_server(
    real_model, second_id, hf_home, tmp_path_factory
):
    single = ServeProcess(real_model, hf_home, tmp_path_factory.mktemp("single"), "--max-context", "512")
    try:
        single.wait_ready(timeout=300)
        expected = {prompt: greedy(single, real_model, prompt) for prompt in PROMPTS}
    finally:
        assert single.stop() == 0
    assert all(expected.values())

    fleet = ServeProcess(
        real_model, hf_home, tmp_path_factory.mktemp("fleet"), "--model", second_id, "--max-context", "512"
    )
    try:
        fleet.wait_ready(timeout=300)
        jobs = [(model, prompt) for prompt in PROMPTS for model in (real_model, second_id)]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(lambda job: greedy(fleet, *job), jobs))
        assert texts == [expected[prompt] for _, prompt in jobs]
        models = {m["id"]: m for m in fleet.health()["models"]}
        assert models[real_model]["state"] == models[second_id]["state"] == "loaded"
        assert models[second_id]["memory_estimate_bytes"] > 0
        # MLX's active memory (the process's, published by the engine after each step) with both loaded, then
        # after `unload`: the unloaded model's weights are given back
        assert greedy(fleet, real_model, PROMPTS[0]) == expected[PROMPTS[0]]
        both = fleet.health()["engine"]["active_memory_bytes"]
        unloaded = httpx.post(fleet.base + "/v1/macprovider/unload", json={"model": second_id}, timeout=120)
        assert unloaded.status_code == 200 and unloaded.json()["macprovider_state"] == "unloaded"
        assert greedy(fleet, real_model, PROMPTS[0]) == expected[PROMPTS[0]]
        one = fleet.health()["engine"]["active_memory_bytes"]
        assert 0 < one < 0.6 * both, (one, both)
    finally:
        assert fleet.stop() == 0
