"""The fleet (macprovider/serve/fleet.py) with fake engines and a fake clock: names and glob aliases, one load
per model under concurrency, least-recently-used eviction to fit the memory budget, a busy model never
unloaded (bounded wait, then 503 model_busy with Retry-After), model_too_large, keep_alive, pinned; and the
same fleet behind the real HTTP app (/v1/models extension fields, routing by alias on every API, the
anthropic SDK with a Claude Code model name reaching the aliased model, `macprovider ps/load/unload`)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_engine import FakeEngine, Script  # noqa: E402

from macprovider.core.config import Settings  # noqa: E402
from macprovider.core.errors import ApiError  # noqa: E402
from macprovider.serve.fleet import KEEP_FOREVER, FleetModel, ServeFleet  # noqa: E402
from macprovider.serve.runtime import ServeRuntime  # noqa: E402


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Factory:
    """Builds a FakeEngine per load (its text names the model), counts loads and releases; a load may be held
    on `gate` or fail with `error`."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.released: list[str] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.error: Exception | None = None
        self.hold: set[str] = set()  # models whose sequences wait for `release_all` before their first chunk
        self.lock = threading.Lock()

    def load(self, model: FleetModel) -> FakeEngine:
        with self.lock:
            self.loads.append(model.id)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.error is not None:
            raise self.error
        script = Script(chunks=(model.id,), hold_after=0 if model.id in self.hold else None)
        return FakeEngine(model_id=model.id, max_context=model.max_context or 64, script=script)

    def release(self, engine: Any) -> None:
        self.released.append(engine.model_id)


def make_fleet(
    models: list[FleetModel], budget: int | None = None, wait: float = 5.0
) -> tuple[ServeFleet, Factory, Clock]:
    factory, clock = Factory(), Clock()
    fleet = ServeFleet(
        models, load=factory.load, release=factory.release, budget_bytes=budget, wait_timeout_s=wait, clock=clock
    )
    return fleet, factory, clock


def model(name: str, size: int = 10, **extra: Any) -> FleetModel:
    return FleetModel(name, max_context=64, estimate_bytes=size, **extra)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# ---------------------------------------------------------------------------------------------- names
def test_ids_exact_aliases_and_glob_aliases_resolve_in_list_order():
    fleet, _, _ = make_fleet(
        [
            model("org/big", aliases=("claude-*sonnet*", "gpt-4o")),
            model("org/small", aliases=("claude-*haiku*", "claude-*")),
        ]
    )
    assert fleet.resolve("org/small").id == "org/small"
    assert fleet.resolve("gpt-4o").id == "org/big"
    assert fleet.resolve("claude-3-5-haiku-20241022").id == "org/small"
    assert fleet.resolve("claude-sonnet-4-5-20250929").id == "org/big"
    assert fleet.resolve("claude-opus-4-1").id == "org/small"  # only the catch-all glob matches


def test_an_unknown_model_is_404_naming_the_available_ones():
    fleet, factory, _ = make_fleet([model("org/a"), model("org/b")])
    with pytest.raises(ApiError) as error:
        run(fleet.acquire("org/other"))
    assert error.value.status == 404 and error.value.code == "model_not_found"
    assert "'org/a'" in error.value.message and "'org/b'" in error.value.message
    assert factory.loads == []  # nothing outside the list is ever loaded


# ---------------------------------------------------------------------------------------------- loading
def test_concurrent_requests_for_an_unloaded_model_share_one_load():
    fleet, factory, _ = make_fleet([model("org/a")])
    factory.gate = threading.Event()

    async def scenario() -> list[Any]:
        waiters = [asyncio.ensure_future(fleet.acquire("org/a")) for _ in range(5)]
        await asyncio.to_thread(factory.started.wait, 30)
        assert fleet.state("org/a") == "loading"
        factory.gate.set()
        leases = await asyncio.gather(*waiters)
        for lease in leases:
            lease.release()
        return leases

    leases = run(scenario())
    assert factory.loads == ["org/a"]
    assert len({id(lease.engine) for lease in leases}) == 1
    assert fleet.state("org/a") == "loaded"


def test_a_failed_load_is_503_for_its_waiters_and_the_next_request_tries_again():
    fleet, factory, _ = make_fleet([model("org/a")])
    factory.error = RuntimeError("weights missing")
    with pytest.raises(ApiError) as error:
        run(fleet.acquire("org/a"))
    assert error.value.status == 503 and "weights missing" in error.value.message
    assert fleet.state("org/a") == "unloaded"
    factory.error = None
    run(fleet.load("org/a"))
    assert fleet.state("org/a") == "loaded" and factory.loads == ["org/a", "org/a"]


# ---------------------------------------------------------------------------------------------- memory
def test_idle_models_are_unloaded_least_recently_used_first_to_make_room():
    fleet, factory, clock = make_fleet([model("org/a"), model("org/b"), model("org/c")], budget=20)

    async def scenario() -> None:
        await fleet.load("org/a")
        clock.now += 1
        await fleet.load("org/b")
        clock.now += 1
        (await fleet.acquire("org/a")).release()  # a is now the most recently used
        clock.now += 1
        await fleet.load("org/c")

    run(scenario())
    assert factory.released == ["org/b"]
    assert [fleet.state(m) for m in ("org/a", "org/b", "org/c")] == ["loaded", "unloaded", "loaded"]
    assert fleet.resident_bytes() == 20


def test_a_model_with_requests_in_flight_is_never_unloaded_the_request_waits_then_gets_model_busy():
    fleet, factory, _ = make_fleet([model("org/a"), model("org/b")], budget=10, wait=0.3)

    async def scenario() -> ApiError:
        held = await fleet.acquire("org/a")
        try:
            with pytest.raises(ApiError) as error:
                await fleet.acquire("org/b")
            assert fleet.state("org/a") == "loaded" and held.engine.model_id == "org/a"
            return error.value
        finally:
            held.release()

    error = run(scenario())
    assert error.status == 503 and error.code == "model_busy"
    assert int(error.headers["Retry-After"]) >= 1
    assert "org/a" in error.message  # says which model holds the memory
    assert factory.released == [] and factory.loads == ["org/a"]


def test_a_waiting_request_gets_the_model_as_soon_as_the_busy_one_finishes():
    fleet, factory, _ = make_fleet([model("org/a"), model("org/b")], budget=10, wait=30)

    async def scenario() -> str:
        held = await fleet.acquire("org/a")
        waiter = asyncio.ensure_future(fleet.acquire("org/b"))
        await asyncio.sleep(0.05)
        assert not waiter.done() and fleet.state("org/b") == "unloaded"
        held.release()
        lease = await waiter
        lease.release()
        return lease.engine.model_id

    assert run(scenario()) == "org/b"
    assert factory.released == ["org/a"]


def test_a_model_that_cannot_fit_even_alone_is_refused_before_loading():
    fleet, factory, _ = make_fleet([model("org/small", 10), model("org/huge", 50)], budget=20)
    with pytest.raises(ApiError) as error:
        run(fleet.acquire("org/huge"))
    assert error.value.status == 503 and error.value.code == "model_too_large"
    assert "memory budget" in error.value.message
    assert factory.loads == []


def test_a_pinned_model_is_never_evicted():
    fleet, factory, _ = make_fleet([model("org/pinned", pinned=True), model("org/b")], budget=10, wait=0.2)
    run(fleet.load_pinned())
    with pytest.raises(ApiError) as error:
        run(fleet.acquire("org/b"))
    assert error.value.code == "model_busy"
    assert fleet.state("org/pinned") == "loaded" and factory.released == []
    with pytest.raises(ApiError) as refused:
        run(fleet.unload("org/pinned"))
    assert refused.value.status == 400


# ---------------------------------------------------------------------------------------------- keep_alive
def test_an_idle_model_unloads_after_its_keep_alive_and_never_with_minus_one():
    fleet, factory, clock = make_fleet([model("org/a", keep_alive=300), model("org/forever", keep_alive=KEEP_FOREVER)])

    async def scenario() -> None:
        await fleet.load("org/a")
        await fleet.load("org/forever")
        clock.now += 299
        assert await fleet.sweep() == []
        clock.now += 1
        assert await fleet.sweep() == ["org/a"]
        clock.now += 10**6
        assert await fleet.sweep() == []

    run(scenario())
    assert factory.released == ["org/a"]
    assert fleet.state("org/a") == "unloaded" and fleet.state("org/forever") == "loaded"


def test_keep_alive_counts_from_the_end_of_the_last_request_and_never_unloads_a_busy_model():
    fleet, factory, clock = make_fleet([model("org/a", keep_alive=60)])

    async def scenario() -> None:
        lease = await fleet.acquire("org/a")
        clock.now += 600  # a long request: the model is busy, not idle
        assert await fleet.sweep() == []
        lease.release()
        clock.now += 59
        assert await fleet.sweep() == []
        clock.now += 1
        assert await fleet.sweep() == ["org/a"]

    run(scenario())
    assert factory.released == ["org/a"]


def test_keep_alive_zero_unloads_when_the_last_request_ends():
    fleet, factory, _ = make_fleet([model("org/a", keep_alive=0)])

    async def scenario() -> None:
        lease = await fleet.acquire("org/a")
        lease.release()
        for _ in range(100):
            if fleet.state("org/a") == "unloaded":
                return
            await asyncio.sleep(0.01)

    run(scenario())
    assert factory.released == ["org/a"] and fleet.state("org/a") == "unloaded"


# ---------------------------------------------------------------------------------------------- over HTTP
@contextlib.contextmanager
def serving_fleet(fleet: ServeFleet) -> Iterator[str]:
    settings = Settings(model=fleet.primary.id, host="127.0.0.1", port=0, drain_timeout_s=5.0, record_workload=False)
    runtime = ServeRuntime(fleet, settings, None)
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    assert runtime.started.wait(15), "server did not start"
    try:
        yield f"http://127.0.0.1:{runtime.port}"
    finally:
        runtime.request_shutdown("test teardown")
        thread.join(15)


def http_fleet() -> tuple[ServeFleet, Factory]:
    fleet, factory, _ = make_fleet(
        [
            FleetModel("org/chat", max_context=64, estimate_bytes=10, aliases=("gpt-4o",)),
            FleetModel("org/fast", max_context=32, estimate_bytes=10, aliases=("claude-*haiku*",)),
        ],
        budget=20,
    )
    return fleet, factory


def test_models_list_every_listed_model_with_context_length_state_and_aliases():
    fleet, _ = http_fleet()
    with serving_fleet(fleet) as base:
        data = httpx.get(base + "/v1/models").json()["data"]
        assert [(m["id"], m["context_length"], m["macprovider_state"], m["macprovider_aliases"]) for m in data] == [
            ("org/chat", 64, "unloaded", ["gpt-4o"]),
            ("org/fast", 32, "unloaded", ["claude-*haiku*"]),
        ]
        assert (
            openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).models.retrieve("org/fast").id
            == "org/fast"
        )
        reply = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "org/chat" and reply.model == "org/chat"
        states = {m["id"]: m["macprovider_state"] for m in httpx.get(base + "/v1/models").json()["data"]}
        assert states == {"org/chat": "loaded", "org/fast": "unloaded"}
        missing = httpx.post(
            base + "/v1/chat/completions", json={"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
        )
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "org/chat" in missing.json()["error"]["message"] and "org/fast" in missing.json()["error"]["message"]


def test_the_anthropic_sdk_with_a_claude_haiku_name_reaches_the_aliased_model():
    fleet, factory = http_fleet()
    with serving_fleet(fleet) as base:
        client = anthropic.Anthropic(
            base_url=base, api_key="x", max_retries=0, timeout=10, _strict_response_validation=True
        )
        message = client.messages.create(
            model="claude-3-5-haiku-20241022", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "org/fast"
        count = client.messages.count_tokens(model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}])
        assert count.input_tokens > 0
        health = httpx.get(base + "/v1/health").json()
        metrics = httpx.get(base + "/metrics").text
    assert 'macprovider_model_loaded{model="org/fast"} 1' in metrics
    assert 'macprovider_model_loaded{model="org/chat"} 0' in metrics
    assert 'macprovider_model_loads_total{model="org/fast"} 1' in metrics
    assert factory.loads == ["org/fast"]
    fast = next(m for m in health["models"] if m["id"] == "org/fast")
    assert fast["state"] == "loaded" and fast["loads"] == 1 and fast["requests_in_flight"] == 0


def test_load_unload_and_ps_commands_act_on_the_running_server(capsys):
    from macprovider.commands import fleet as commands

    fleet, factory = http_fleet()
    with serving_fleet(fleet) as base:
        commands.load("claude-3-haiku", url=base, config=None)
        assert capsys.readouterr().out.strip() == "loaded org/fast"
        commands.ps(url=base, as_json=False, config=None)
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:2] == ["MODEL", "STATE"]
        rows = {line.split()[0]: line.split()[1] for line in table[1:]}
        assert rows == {"org/chat": "unloaded", "org/fast": "loaded"}
        commands.unload("org/fast", url=base, config=None)
        assert capsys.readouterr().out.strip() == "unloaded org/fast"
        assert httpx.get(base + "/v1/models/org/fast").json()["macprovider_state"] == "unloaded"
        import typer

        with pytest.raises(typer.Exit) as exit_info:
            commands.load("nope", url=base, config=None)
        assert exit_info.value.exit_code == 1
        assert "404" in capsys.readouterr().err
    assert factory.released == ["org/fast"]


def test_over_http_a_busy_model_in_the_way_is_503_model_busy_with_retry_after_and_too_large_is_refused():
    factory, clock = Factory(), Clock()
    fleet = ServeFleet(
        [
            FleetModel("org/chat", max_context=64, estimate_bytes=10),
            FleetModel("org/fast", max_context=64, estimate_bytes=10, aliases=("claude-*haiku*",)),
            FleetModel("org/huge", max_context=64, estimate_bytes=100),
        ],
        load=factory.load,
        release=factory.release,
        budget_bytes=15,
        wait_timeout_s=0.5,
        clock=clock,
    )
    factory.hold = {"org/chat"}
    with serving_fleet(fleet) as base, httpx.Client(base_url=base, timeout=30) as http:
        body = {"model": "org/chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            engine = fleet.engine("org/chat")
            assert engine is not None and engine.wait_active(1)
            busy = http.post("/v1/chat/completions", json={**body, "model": "org/fast", "stream": False})
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["code"] == "model_busy" and "org/chat" in busy.json()["error"]["message"]
            anthropic_busy = http.post(
                "/v1/messages",
                json={"model": "claude-haiku-4-5", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert anthropic_busy.status_code == 503 and anthropic_busy.json()["type"] == "error"
            engine.release_all()
            assert "[DONE]" in held.read().decode()
        huge = http.post("/v1/chat/completions", json={**body, "model": "org/huge", "stream": False})
        assert huge.status_code == 503 and huge.json()["error"]["code"] == "model_too_large"
        served = http.post("/v1/chat/completions", json={**body, "model": "org/fast", "stream": False})
        assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"] == "org/fast"
    assert factory.loads == ["org/chat", "org/fast"] and factory.released == ["org/chat"]
