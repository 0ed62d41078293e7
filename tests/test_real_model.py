"""The real-model tier (docs/architecture.md#tests): SmolLM2-135M-Instruct imported by our importer (`real_model`
fixture), served by `macprovider serve` and judged against outside oracles — mlx-lm's own greedy generation
on the same directory, `jsonschema`, the model's own tokenizer. Kept short: 16 generated tokens a request."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import pytest

from tests.test_e2e_serve import ServeProcess

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="session")
def real_server(real_model, hf_home, tmp_path_factory):
    server = ServeProcess(
        real_model, hf_home, tmp_path_factory.mktemp("real-serve-home"), "--max-batch", "4", "--max-context", "1024"
    )
    try:
        server.wait_ready(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oracle(real_model_dir):
    """mlx-lm's own loader and greedy decoding loop on the same model directory."""
    from mlx_lm import load

    return load(str(real_model_dir))


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def oracle_greedy(oracle, question: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int]]:
    """(prompt tokens, generated tokens up to and excluding the first end token) by mlx-lm's generate_step
    with argmax sampling."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    model, tokenizer = oracle
    prompt = tokenizer.apply_chat_template(messages(question), add_generation_prompt=True)
    generated = []
    for token, _ in generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            break
        generated.append(token)
    return prompt, generated


def ask(server, question: str, **extra):
    return server.client().chat.completions.create(
        model=server.model, messages=messages(question), max_tokens=MAX_TOKENS, temperature=0, **extra
    )


def test_the_demo_question_is_answered(real_server):
    answer = ask(real_server, "What is the capital of France?")
    assert "Paris" in answer.choices[0].message.content


def test_greedy_output_equals_mlx_lm_generate_alone(real_server, oracle):
    _, tokenizer = oracle
    for question in QUESTIONS[:3]:
        prompt, expected = oracle_greedy(oracle, question)
        answer = ask(real_server, question)
        assert answer.choices[0].message.content == tokenizer.decode(expected)
        assert answer.usage.prompt_tokens == len(prompt)
        assert answer.usage.completion_tokens == len(expected)  # the end-of-turn token is not counted


def test_greedy_output_equals_mlx_lm_generate_in_a_batch_with_late_joiners(real_server, oracle):
    """Two requests start; the other two join once the first has streamed a token (a running batch)."""
    _, tokenizer = oracle
    expected = {q: tokenizer.decode(oracle_greedy(oracle, q)[1]) for q in QUESTIONS}
    first_token = threading.Event()
    client = real_server.client()

    def stream(question: str, signal: bool) -> str:
        parts = []
        for chunk in client.chat.completions.create(
            model=real_server.model, messages=messages(question), max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                if signal:
                    first_token.set()
        return "".join(parts)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        early = [pool.submit(stream, q, i == 0) for i, q in enumerate(QUESTIONS[:2])]
        assert first_token.wait(timeout=240)
        late = [pool.submit(stream, q, False) for q in QUESTIONS[2:]]
        results = [f.result(timeout=300) for f in early + late]
    assert results == [expected[q] for q in QUESTIONS]
    assert real_server.health()["engine"]["peak_active_sequences"] >= 3


def test_streaming_equals_non_streaming_byte_for_byte_with_emoji_and_cjk(real_server):
    """Multi-byte characters whose UTF-8 bytes span byte-level BPE tokens come out whole in both modes."""
    client = real_server.client()
    prompt = "日本 🌊 東京 🌊 日本 🌊 東京 🌊 日本 🌊 東京 🌊"
    full = client.completions.create(model=real_server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=real_server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        if chunk.choices
    )
    text = full.choices[0].text
    assert streamed.encode() == text.encode()
    assert any(0x4E00 <= ord(ch) <= 0x9FFF for ch in text) and any(ord(ch) >= 0x1F300 for ch in text), text
    assert "\ufffd" not in text.rstrip("\ufffd")  # whole characters; only a cut at max_tokens may end mid-character


def test_stop_string_on_real_text(real_server):
    answer = ask(real_server, "What is the capital of France?", stop=["Paris"])
    assert answer.choices[0].finish_reason == "stop"
    content = answer.choices[0].message.content
    assert "Paris" not in content and content.startswith("The capital of France is")


def test_json_schema_output_validates(real_server):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    answer = real_server.client().chat.completions.create(
        model=real_server.model,
        messages=messages("What is the capital of France? Reply in JSON with the city and the country."),
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
    )
    payload = json.loads(answer.choices[0].message.content)
    jsonschema.validate(payload, schema)
    assert "Paris" in payload["city"]


def test_kv_bits_next_token_kl_divergence_is_bounded(oracle):
    """KL(full-precision KV ‖ quantized KV) of the next-token distributions over a real prompt, with the
    engine's cache factory (macprovider.engine.kvcache): small at 8 bits, larger but bounded at 4 bits."""
    import mlx.core as mx

    from macprovider.engine.kvcache import make_cache_factory

    model, tokenizer = oracle
    prompt = tokenizer.apply_chat_template(
        messages("Write a short paragraph about why the sea is salty, and what lives in it."),
        add_generation_prompt=True,
    )
    tokens = mx.array([prompt])

    def log_probs(kv_bits):
        logits = model(tokens, cache=make_cache_factory(model, kv_bits, 64)())[0, -16:].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    full = log_probs(None)
    divergence = {}
    for bits in (8, 4):
        per_position = mx.sum(mx.exp(full) * (full - log_probs(bits)), axis=-1)
        divergence[bits] = (mx.mean(per_position).item(), mx.max(per_position).item())
    print("next-token KL (mean, max) over the last 16 positions:", divergence)
    # Measured on this prompt: 8 bits ≈ (0.0004, 0.0013), 4 bits ≈ (0.10, 0.41) nats.
    assert 0 < divergence[8][0] and divergence[8][1] < 0.01
    assert divergence[8][0] < divergence[4][0] < 0.2 and divergence[4][1] < 1.0


def test_forced_tool_call_round_trip_on_real_weights(real_tools_server):
    from tests.test_agents_tools import ASK, TIME, WEATHER

    client, model = real_tools_server.client(), real_tools_server.model
    first = client.chat.completions.create(
        model=model,
        messages=ASK,
        tools=[WEATHER, TIME],
        max_tokens=48,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # real weights read the question
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(
        model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=MAX_TOKENS, temperature=0
    )
    text = answer.choices[0].message.content
    assert text and "<tool_call>" not in text


# ---------------------------------------------------------------------------------------------- the other APIs
def anthropic_client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def test_responses_api_on_real_weights(real_server):
    """`responses.create` answers the demo question; the stream carries the same text; a continuation by
    `previous_response_id` sees the first turn (its prompt grows by it)."""
    client = real_server.client()
    first = client.responses.create(
        model=real_server.model, input="What is the capital of France?", max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert "Paris" in first.output_text
    events = list(
        client.responses.create(
            model=real_server.model,
            input="What is the capital of France?",
            max_output_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
    assert events[-1].type in ("response.completed", "response.incomplete")
    second = client.responses.create(
        model=real_server.model,
        previous_response_id=first.id,
        input="And of Italy?",
        max_output_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_anthropic_messages_on_real_weights(real_server):
    client = anthropic_client(real_server)
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    message = client.messages.create(
        model=real_server.model, max_tokens=MAX_TOKENS, messages=ask, extra_body={"temperature": 0}
    )
    assert "Paris" in message.content[0].text and message.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(
        model=real_server.model, max_tokens=MAX_TOKENS, messages=ask, extra_body={"temperature": 0}
    ) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == message.content[0].text


def test_responses_and_anthropic_tool_round_trips_on_real_weights(real_tools_server):
    from tests.test_agents_tools import ASK, WEATHER

    server = real_tools_server
    client = server.client()
    tool = {"type": "function", **WEATHER["function"]}
    first = client.responses.create(
        model=server.model,
        input=ASK[0]["content"],
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=48,
        temperature=0,
    )
    [call] = first.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    answer = client.responses.create(
        model=server.model,
        previous_response_id=first.id,
        tools=[tool],
        tool_choice="none",
        temperature=0,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps({"temp_c": 18, "sky": "sunny"}),
            }
        ],
        max_output_tokens=MAX_TOKENS,
    )
    assert answer.output_text and "<tool_call>" not in answer.output_text

    anthropic_tool = {
        "name": "get_weather",
        "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"],
    }
    messages = anthropic_client(server)
    use_message = messages.messages.create(
        model=server.model,
        max_tokens=48,
        messages=ASK,
        tools=[anthropic_tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert use_message.stop_reason == "tool_use"
    [use] = use_message.content
    assert use.type == "tool_use" and use.input == {"city": "Paris"}
    history = ASK + [
        {"role": "assistant", "content": [use.model_dump()]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": json.dumps({"temp_c": 18, "sky": "sunny"})}
            ],
        },
    ]
    reply = messages.messages.create(
        model=server.model,
        max_tokens=MAX_TOKENS,
        messages=history,
        tools=[anthropic_tool],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    )
    assert reply.content[0].type == "text" and reply.content[0].text and "<tool_call>" not in reply.content[0].text


def test_quantized_float32_weights_answer_as_the_dequantized_ones_in_a_fraction_of_the_memory(
    real_server, real_q4_model, hf_home, tmp_path_factory
):
    """The Q4_1 checkpoint served with its scales in float32 (`--weights-dtype quantized-float32`, what `auto`
    picks on MLX's CPU backend when the float32 copy does not fit) gives the same greedy text as the
    float32-dequantized import of the same GGUF: the same weight values, computed in float32 both ways."""
    server = ServeProcess(
        real_q4_model,
        hf_home,
        tmp_path_factory.mktemp("q4-home"),
        "--weights-dtype",
        "quantized-float32",
        "--max-context",
        "512",
        "--log-level",
        "info",
    )
    try:
        server.wait_ready(timeout=300)
        assert "weights=quantized-float32" in server.stderr()
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answers = [
            s.client()
            .chat.completions.create(model=s.model, messages=question, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
            for s in (server, real_server)
        ]
        assert answers[0] == answers[1] and "Paris" in answers[0]
        assert server.health()["engine"]["peak_memory_bytes"] < real_server.health()["engine"]["peak_memory_bytes"] / 2
    finally:
        server.stop()


def test_speculative_greedy_output_equals_mlx_lm_generate(real_model, engines, oracle):
    """`speculative: prompt-lookup` on real weights (an in-process engine: a process forked after the oracle
    has run MLX threads could hang): prompts the model answers by quoting them, so drafts are verified and
    accepted, give exactly mlx-lm's greedy tokens — alone and four in one batch."""
    import asyncio

    from macprovider.engine.protocol import GenerationRequest

    questions = [
        "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog near the river bank.",
        "Copy this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, oranges.",
        "Repeat exactly: def add(a, b):\n    return a + b",
        "Say this again word for word: to be or not to be, that is the question.",
    ]
    max_tokens = 32
    expected = {q: oracle_greedy(oracle, q, max_tokens)[1] for q in questions}  # token ids
    engine = engines(real_model, max_concurrency_override=4, speculative="prompt-lookup")

    async def generate(question: str) -> str:
        prompt = engine.encode_chat(messages(question))
        handle = engine.submit(GenerationRequest(prompt_tokens=prompt, max_tokens=max_tokens, temperature=0.0))
        return "".join([chunk.text async for chunk in handle])

    async def together() -> list[str]:
        return await asyncio.gather(*(generate(q) for q in questions))

    _, tokenizer = oracle
    assert asyncio.run(generate(questions[0])) == tokenizer.decode(expected[questions[0]])
    assert asyncio.run(together()) == [tokenizer.decode(expected[q]) for q in questions]
    assert engine.stats().speculative_accepted_tokens_total > 0
