"""The content-free request-shape record (serve/workload.py, macprovider/core/request_shapes.py;
docs/autotune.md#objectives-and-workloads)."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import chat_body, serving

from macprovider.core.config import Paths
from macprovider.core.request_shapes import RequestShape, WorkloadError, load_shapes, parse_shapes, shapes_jsonl
from macprovider.serve.workload import WorkloadRecorder


def test_served_requests_leave_their_shapes_and_no_content(isolated_env):
    with serving() as server:
        body = chat_body(server.engine, max_tokens=7)
        body["messages"][0]["content"] = "a secret prompt nobody may keep"
        with httpx.Client(base_url=server.base, timeout=10) as http:
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                response.read()
        server.runtime.app.state.workload_recorder.flush(timeout=10)
    path = Paths.from_env().workload_file
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert "secret" not in text and "Hello" not in text
    shapes = load_shapes(path)
    assert len(shapes) == 2
    for shape in shapes:
        assert shape.prompt_tokens > 0 and shape.max_tokens == 7 and shape.cached_tokens == 2
        assert shape.concurrency == 1 and shape.endpoint == "chat" and shape.completion_tokens is not None


def test_record_workload_off_writes_nothing(isolated_env):
    with serving(record_workload=False) as server:
        with httpx.Client(base_url=server.base, timeout=10) as http:
            assert http.post("/v1/chat/completions", json=chat_body(server.engine)).status_code == 200
        assert server.runtime.app.state.workload_recorder is None
    assert not Paths.from_env().workload_file.exists()


def test_the_record_keeps_the_newest_shapes_only(tmp_path):
    path = tmp_path / "record" / "w.jsonl"
    recorder = WorkloadRecorder(path, limit=3)
    for n in range(1, 8):
        recorder.submit(RequestShape(prompt_tokens=n))
    recorder.close()
    kept = [s.prompt_tokens for s in load_shapes(path)]
    assert kept == [4, 5, 6, 7]  # rewritten to the newest 3 at 6 lines, then one more appended
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.jsonl"]  # no temp file left


def test_an_unwritable_record_never_fails_requests(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recorder = WorkloadRecorder(blocker / "w.jsonl")  # parent is a file: every write fails
    recorder.submit(RequestShape(prompt_tokens=3))
    recorder.flush(timeout=10)
    assert recorder._failed
    recorder.submit(RequestShape(prompt_tokens=4))  # dropped quietly
    recorder.close()


def test_workload_files_parse_as_jsonl_or_json_array(tmp_path):
    shapes = [
        RequestShape(prompt_tokens=100, cached_tokens=60, max_tokens=32, concurrency=2),
        RequestShape(prompt_tokens=5),
    ]
    assert parse_shapes(shapes_jsonl(shapes), "f") == shapes
    assert parse_shapes(
        json.dumps(
            [{"prompt_tokens": 100, "cached_tokens": 60, "max_tokens": 32, "concurrency": 2}, {"prompt_tokens": 5}]
        ),
        "f",
    ) == [
        RequestShape(prompt_tokens=100, cached_tokens=60, max_tokens=32, concurrency=2),
        RequestShape(prompt_tokens=5),
    ]
    assert parse_shapes('{"prompt_tokens": 4, "cached_tokens": 9}', "f")[0].cached_tokens == 3


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no request shapes"),
        ('{"prompt_tokens": 0}', "line 1: prompt_tokens must be an integer >= 1"),
        ('{"prompt_tokens": 3}\nnot json', "line 2: not valid JSON"),
        ('[{"prompt_tokens": 3, "concurrency": "2"}]', "item 1: concurrency"),
        ("[1]", "item 1: a request shape must be a JSON object"),
        ("[" + "9" * 5000 + "]", "w.jsonl: not valid JSON"),  # a plain ValueError (integer digit limit)
    ],
)
def test_bad_workload_files_are_named_errors(text, match):
    with pytest.raises(WorkloadError, match=match):
        parse_shapes(text, "w.jsonl")
