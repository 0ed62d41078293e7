"""`--workload recorded|FILE`: replayed prompts follow the shapes and really share their prefixes
(docs/autotune.md#objectives-and-workloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from macprovider.autotune.replay import REPLAY_MAX_REQUESTS, ReplayWorkload, fitted, shapes_digest, workload_summary
from macprovider.core.request_shapes import RequestShape
from macprovider.models.demo import TinyModelSpec, build_model_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_files(tmp_path_factory.mktemp("replay-model"), TinyModelSpec())


def ids(workload: ReplayWorkload, messages) -> list[int]:
    text = workload.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return workload.tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_replayed_prompts_have_the_recorded_sizes_concurrency_and_shared_prefix(model_dir):
    shapes = [RequestShape(120, 80, 16, 2), RequestShape(60, 0, None, 1), RequestShape(10_000, 9_000, 5_000, 3)]
    workload = ReplayWorkload(model_dir, 256, shapes, "file", "shapes.jsonl")
    assert workload.fits == [(120, 80, 16), (60, 0, 64), (128, 127, 128)]  # fitted to a 256-token context
    requests = workload.round(0, 1, seed=7)
    assert [r.concurrency for r in requests] == [2, 1, 3] and [r.max_tokens for r in requests] == [16, 64, 128]
    warm = ids(workload, workload.warmup(7).messages)
    assert len(warm) <= 127  # the shared document at the longest cached prefix
    for request, (prompt, cached, _) in zip(requests, workload.fits):
        tokens = ids(workload, request.messages)
        assert prompt - 12 <= len(tokens) <= prompt
        shared = common_prefix(tokens, warm)
        if cached:  # the document's tokens up to the room the request's own head line leaves
            room = min(cached, prompt - workload._head_tokens)
            assert room - 12 <= shared <= cached
        else:
            assert shared < 8  # only the chat template's opening
    # live windows: each request with the ones sent before it, as many as its concurrency; the warm-up leaves
    # each shape's prefix in the cache, so a request prefills only the rest of its prompt
    rows = [(prompt + out, prompt - workload.reused_tokens(prompt, cached)) for prompt, cached, out in workload.fits]
    assert [r[1] for r in rows] == [120 - workload.reused_tokens(120, 80), 60, 128 - workload.reused_tokens(128, 127)]
    assert rows[1] == (124, 60) and rows[0][1] < 120
    assert workload.memory_shape()["live_windows"] == [rows[:1], rows[1:2], rows[:3]]
    again = workload.round(1, 1, seed=7)
    assert all(a.messages != b.messages for a, b in zip(requests, again))  # each replicate its own filler


def test_cached_tokens_and_summary_name_the_replayed_shapes(model_dir):
    shapes = [RequestShape(100 + i, 50, 8, 1 + i % 3) for i in range(REPLAY_MAX_REQUESTS + 4)]
    workload = ReplayWorkload(model_dir, 256, shapes, "recorded", "/cfg/workload.jsonl")
    assert len(workload.shapes) == REPLAY_MAX_REQUESTS and workload.shapes[0] == shapes[4]  # the newest
    per_request = [min(256, p + out) for p, _, out in workload.fits]
    assert workload.cached_tokens(256, 1, 1) == 51 + sum(per_request)
    summary = workload.describe()
    assert summary == workload_summary("recorded", "/cfg/workload.jsonl", shapes)
    assert (summary["shapes"], summary["replayed"], summary["max_concurrency"]) == (20, 16, 3)
    assert summary["digest"] == shapes_digest(shapes[4:])
    later = [RequestShape(s.prompt_tokens, s.cached_tokens, s.max_tokens, s.concurrency, ts=123) for s in shapes[4:]]
    assert shapes_digest(later) == summary["digest"]  # timestamps are not part of the workload's identity
    assert fitted(RequestShape(5, 9, None, 1), 4) == (2, 1, 2)
    assert workload_summary("synthetic", None, ()) == {"kind": "synthetic"}
