"""Two tiny models behind one real `macprovider serve` (a YAML `models:` fleet) with a memory budget that fits
one: alternating requests swap them with no request failed or cut, concurrent streams to both wait for each
other instead of failing, a Claude Code model name reaches its glob alias through the anthropic SDK, idle
models unload after keep_alive, and `macprovider ps` shows it all."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest

from macprovider.core import config as cfg
from macprovider.core.processes import die_with_parent
from macprovider.models.hub_cache import install_in_hub_cache
from macprovider.serve.preflight import plan_fleet
from tests.readiness import wait_healthy
from tests.test_e2e_serve import ServeProcess, _free_port

pytestmark = pytest.mark.e2e

SECOND = "macprovider-test/tiny-chat-2"


@pytest.fixture(scope="module")
def second_tiny(tiny_model, hf_home, tmp_path_factory) -> str:
    """The tiny model installed again under a second id (same files)."""
    snapshot = next((hf_home / "hub" / ("models--" + tiny_model.replace("/", "--")) / "snapshots").iterdir())
    source = tmp_path_factory.mktemp("tiny-second")
    for path in snapshot.iterdir():
        shutil.copyfile(path.resolve(), source / path.name)
    install_in_hub_cache(source, SECOND, hf_home / "hub")
    return SECOND


def fleet_yaml(first: str, second: str, budget_gb: float | None) -> str:
    budget = f"memory_budget_gb: {budget_gb!r}\n" if budget_gb is not None else ""
    return (
        f"max_context_override: 256\nkeep_alive: 3\nmodel_wait_timeout_s: 120\nrecord_workload: false\n{budget}"
        f'models:\n  - id: {first}\n  - id: {second}\n    aliases: ["claude-*haiku*"]\n'
    )


def test_two_models_swap_within_a_budget_that_fits_one(tiny_model, second_tiny, hf_home, tmp_path):
    home = tmp_path / "home"
    config = home / ".config" / "macprovider" / "config.yaml"
    config.parent.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACPROVIDER_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    # The budget: one model's estimate (the server's own preflight computes it the same way) and a half.
    config.write_text(fleet_yaml(tiny_model, second_tiny, None))
    _, models = plan_fleet(cfg.resolve({}, env, ram_gb=16), None, env)
    one = models[0].estimate_bytes
    assert one > 0 and models[1].estimate_bytes == one
    config.write_text(fleet_yaml(tiny_model, second_tiny, 1.5 * one / 2**30))

    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "macprovider", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, lambda: process.poll() is None, lambda: (tmp_path / "serve.log").read_text(), 120)
        listed = httpx.get(base + "/v1/models").json()["data"]
        assert [(m["id"], m["macprovider_state"], m["context_length"]) for m in listed] == [
            (tiny_model, "unloaded", 256),
            (second_tiny, "unloaded", 256),
        ]
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)

        def chat(model: str) -> str:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
            )
            assert reply.model == model and reply.choices[0].finish_reason in ("stop", "length")
            return reply.choices[0].message.content or ""

        texts = [chat(m) for m in (tiny_model, second_tiny, tiny_model, second_tiny)]
        assert texts[0] == texts[2] and texts[1] == texts[3]  # a reloaded model answers as before
        states = {m["id"]: m for m in httpx.get(base + "/v1/health").json()["models"]}
        assert states[tiny_model]["loads"] == 2 and states[second_tiny]["loads"] == 2
        assert states[tiny_model]["state"] == "unloaded" and states[second_tiny]["state"] == "loaded"
        assert states[tiny_model]["unloads"] == 2 and states[second_tiny]["unloads"] == 1

        # concurrent streams to both: one waits for the other to finish, then the models swap; none fails
        def stream(model: str) -> tuple[str | None, str]:
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "tell me"}],
                    max_tokens=24,
                    temperature=0,
                    stream=True,
                )
            )
            return chunks[-1].choices[0].finish_reason, "".join(
                c.choices[0].delta.content or "" for c in chunks if c.choices
            )

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(stream, [tiny_model, second_tiny, tiny_model, second_tiny]))
        assert all(finish in ("stop", "length") for finish, _ in results)
        assert results[0][1] == results[2][1] and results[1][1] == results[3][1]

        # Claude Code's small/fast model name reaches the glob alias
        message = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120).messages.create(
            model="claude-3-5-haiku-20241022", max_tokens=4, messages=[{"role": "user", "content": "hello"}]
        )
        assert message.model == second_tiny and message.stop_reason in ("end_turn", "max_tokens")

        ps = subprocess.run(
            [sys.executable, "-m", "macprovider", "ps", "--url", base],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ps.returncode == 0, ps.stderr
        rows = {line.split()[0]: line.split()[1] for line in ps.stdout.splitlines()[1:]}
        assert set(rows) == {tiny_model, second_tiny} and "loaded" in rows.values()

        # keep_alive 3 s: both idle models unload
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            models_now = httpx.get(base + "/v1/health").json()["models"]
            if all(m["state"] == "unloaded" for m in models_now):
                break
            time.sleep(0.25)
        assert [m["state"] for m in models_now] == ["unloaded", "unloaded"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_a_chat_model_and_an_embedding_model_behind_one_endpoint(tiny_model, embedding_server, hf_home, tmp_path):
    """`serve --model CHAT --model EMBEDDING`: each API reaches its model through the fleet, each model refuses
    the other's routes with a 400 naming what it serves, and the vectors equal a single-model server's."""
    embedding_id = embedding_server.model
    home = tmp_path / "fleet-home"
    home.mkdir()
    server = ServeProcess(tiny_model, hf_home, home, "--model", embedding_id, "--max-context", "256")
    try:
        server.wait_ready(timeout=300)
        client = server.client()
        listed = {model.id for model in client.models.list().data}
        assert listed == {tiny_model, embedding_id}
        texts = ["The sea is wide.", "Paris is the capital of France."]
        fleet_vectors = [d.embedding for d in client.embeddings.create(model=embedding_id, input=texts).data]
        alone = embedding_server.client().embeddings.create(model=embedding_id, input=texts).data
        for mine, reference in zip(fleet_vectors, alone):
            dot = sum(a * b for a, b in zip(mine, reference.embedding))
            assert len(mine) == 384 and dot >= 0.9999
        answer = client.chat.completions.create(
            model=tiny_model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
        )
        assert answer.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=tiny_model, input="hello")
        assert refused.value.body["code"] == "unsupported_model_route"
        with pytest.raises(openai.BadRequestError) as refused_chat:
            client.chat.completions.create(
                model=embedding_id, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
            )
        assert "/v1/embeddings" in refused_chat.value.body["message"]
    finally:
        server.stop()
