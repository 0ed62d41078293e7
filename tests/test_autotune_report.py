"""Report: terminal block, JSON keys, recipe hash with a pinned vector (docs/autotune.md#report)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import rfc8785

from macprovider.autotune.report import (
    Recommendation,
    build_report,
    recipe_domain,
    recipe_hash,
    render_terminal,
    trial_summary,
    verify_recipe_hash,
)
from macprovider.autotune.search import Infeasible, Knobs, Trial

CANDIDATES = ["mlx-community/Qwen2.5-14B-Instruct-4bit", "mlx-community/Llama-3.2-1B-Instruct-4bit"]
MACHINE = {"ram_gb": 32, "chip": "Apple M2 Pro", "os_version": "macOS 15.1", "binary_version": "0.1.0"}
INPUTS = {
    "target_context": 2000,
    "candidate_models": CANDIDATES,
    "stage1_replicates": 1,
    "stage2_replicates": 3,
    "gate_ttft_ms": 60000,
    "tps_tie_epsilon": 0.02,
}
REC = Recommendation(CANDIDATES[0], 2000, 8, 2, 4096, 23.456, 812.4, 3)
# Pinned vector: the canonical (RFC 8785) domain text and its SHA-256, computed independently of the code.
PINNED_JCS = (
    b'{"binary_version":"0.1.0","candidate_models":["mlx-community/Qwen2.5-14B-Instruct-4bit",'
    b'"mlx-community/Llama-3.2-1B-Instruct-4bit"],"chip":"Apple M2 Pro","knobs":{"kv_bits":8,'
    b'"max_concurrency_override":2,"max_context_override":4096},"model":"mlx-community/Qwen2.5-14B-Instruct-4bit",'
    b'"ram_gb":32,"target_context":2000}'
)
PINNED_HASH = "sha256:a9e5ee9206c399a31c99269716e6f06edf38a62aee40e0999039d3ae3654b864"


def report(rec=REC, **kw):
    args = dict(
        run_id="11111111-2222-3333-4444-555555555555",
        started_at="2026-01-01T00:00:00.000Z",
        ended_at="2026-01-01T00:10:00.000Z",
        machine=MACHINE,
        inputs=INPUTS,
        recommendation=rec,
        infeasible=[],
        alternates=CANDIDATES[1:],
        db_path="/db.sqlite",
        exit_reason="ok" if rec else "no_feasible",
    )
    args.update(kw)
    return build_report(**args)


def test_recipe_hash_pinned_vector():
    domain = recipe_domain(binary_version="0.1.0", candidate_models=CANDIDATES, chip="Apple M2 Pro", ram_gb=32, rec=REC)
    assert rfc8785.dumps(domain) == PINNED_JCS
    assert "sha256:" + hashlib.sha256(PINNED_JCS).hexdigest() == PINNED_HASH
    assert recipe_hash(domain) == PINNED_HASH
    assert report()["recipe_hash"] == PINNED_HASH


def test_recipe_hash_ignores_measurements_but_not_machine_version_or_inputs():
    base = report()["recipe_hash"]
    faster = Recommendation(CANDIDATES[0], 2000, 8, 2, 4096, 99.0, 1.0, 5)
    assert report(rec=faster)["recipe_hash"] == base
    assert report(machine={**MACHINE, "ram_gb": 64})["recipe_hash"] != base
    assert report(machine={**MACHINE, "binary_version": "0.2.0"})["recipe_hash"] != base
    assert report(inputs={**INPUTS, "candidate_models": CANDIDATES[::-1]})["recipe_hash"] != base
    unset = Recommendation(CANDIDATES[0], 2000, None, 2, 4096, 1, 1, 1)
    assert report(rec=unset)["recipe_hash"] != base
    assert report(rec=None)["recipe_hash"] is None
    assert verify_recipe_hash(report()) and verify_recipe_hash(report(rec=None))
    tampered = report()
    tampered["recommendation"]["knobs"]["kv_bits"] = 4
    assert not verify_recipe_hash(tampered)


def test_json_report_has_every_key_with_yaml_knob_names():
    r = report(infeasible=[Infeasible("a/b", 1, "memory estimate 9 GiB")])
    assert set(r) >= {
        "spec_version",
        "run_id",
        "started_at",
        "ended_at",
        "machine",
        "inputs",
        "recommendation",
        "alternates",
        "infeasible",
        "recipe_hash",
        "db_path",
        "exit_reason",
    }
    assert set(r["machine"]) == {"ram_gb", "chip", "os_version", "binary_version"}
    assert set(r["inputs"]) == {
        "target_context",
        "candidate_models",
        "stage1_replicates",
        "stage2_replicates",
        "gate_ttft_ms",
        "tps_tie_epsilon",
    }
    rec = r["recommendation"]
    assert set(rec) >= {"model", "target_context", "knobs", "tps_median", "ttft_p95_ms", "replicates", "serve_command"}
    assert set(rec) - {
        "model",
        "target_context",
        "knobs",
        "tps_median",
        "ttft_p95_ms",
        "replicates",
        "serve_command",
    } == {"memory_estimate_bytes", "peak_memory_bytes", "why"}  # the additions
    assert rec["knobs"] == {
        "kv_bits": 8,
        "max_concurrency_override": 2,
        "max_context_override": 4096,
        "speculative": "off",
    }
    assert rec["serve_command"] == (
        "macprovider serve --model mlx-community/Qwen2.5-14B-Instruct-4bit --kv-bits 8 --max-batch 2 --max-context 4096"
    )
    assert r["infeasible"] == [{"model": "a/b", "rank": 1, "reason": "memory estimate 9 GiB"}]
    assert r["started_at"].endswith("Z")


def test_terminal_block_matches_the_spec_layout():
    text = render_terminal(report())
    assert text == (
        "============================ RECOMMENDATION ============================\n"
        "model:           mlx-community/Qwen2.5-14B-Instruct-4bit\n"
        "target_context:  2000\n"
        "knobs:\n"
        "  kv_bits:                    8\n"
        "  max_concurrency_override:   2\n"
        "  max_context_override:       4096\n"
        "measured:\n"
        "  tps_median:        23.5 tokens/sec\n"
        "  ttft_p95:          812 ms\n"
        "  replicates:        3\n"
        "\n"
        "alternates (smaller candidates from input list, not probed):\n"
        "  - mlx-community/Llama-3.2-1B-Instruct-4bit\n"
        "\n"
        "serve command (copy-paste):\n"
        "  macprovider serve --model mlx-community/Qwen2.5-14B-Instruct-4bit --kv-bits 8 --max-batch 2 --max-context 4096\n"
        "\n"
        "run_id: 11111111-2222-3333-4444-555555555555 | db: /db.sqlite\n"
        "========================================================================\n"
    )


def test_terminal_block_unset_kv_and_no_alternates():
    text = render_terminal(report(rec=Recommendation("a/b", 100, None, 1, 100, 5.0, 10.0, 1), alternates=[]))
    assert "  kv_bits:                    unset\n" in text
    assert "  - none\n" in text
    assert "--kv-bits" not in text


def test_no_recommendation_block_lists_ranked_reasons():
    text = render_terminal(
        report(
            rec=None,
            alternates=[],
            infeasible=[Infeasible("s/1B", 2, "ttft"), Infeasible("b/32B", 1, "memory estimate")],
        )
    )
    assert "NO RECOMMENDATION" in text.splitlines()[0] and len(text.splitlines()[0]) == 72
    assert "  rank 2 s/1B: ttft\n  rank 1 b/32B: memory estimate\n" in text
    assert "--target-context" in text and "--candidate-models" in text


def test_default_objective_and_workload_keep_the_pinned_hash_and_others_change_it():
    """The objective and the workload join the hash domain only when not the defaults."""
    default_inputs = {**INPUTS, "objective": "throughput", "workload": {"kind": "synthetic"}}
    assert report(inputs=default_inputs)["recipe_hash"] == PINNED_HASH
    latency = report(inputs={**default_inputs, "objective": "latency"})
    balanced = report(inputs={**default_inputs, "objective": "balanced"})
    recorded = {"kind": "recorded", "source": "/w.jsonl", "shapes": 3, "replayed": 3, "digest": "sha256:ab"}
    replay = report(inputs={**default_inputs, "workload": recorded})
    other = report(inputs={**default_inputs, "workload": {**recorded, "digest": "sha256:cd"}})
    hashes = {PINNED_HASH, latency["recipe_hash"], balanced["recipe_hash"], replay["recipe_hash"], other["recipe_hash"]}
    assert len(hashes) == 5
    for r in (latency, balanced, replay, other):
        assert verify_recipe_hash(r)
    domain = recipe_domain(
        binary_version="0.1.0",
        candidate_models=CANDIDATES,
        chip="Apple M2 Pro",
        ram_gb=32,
        rec=REC,
        objective="latency",
        workload=recorded,
    )
    assert domain["objective"] == "latency" and domain["workload"] == {"kind": "recorded", "digest": "sha256:ab"}
    # same inputs, other measurements: same hash
    assert (
        report(
            inputs={**default_inputs, "objective": "latency"},
            rec=Recommendation(CANDIDATES[0], 2000, 8, 2, 4096, 1.0, 99999.0, 1),
        )["recipe_hash"]
        == latency["recipe_hash"]
    )


def test_terminal_block_names_a_non_default_objective_workload_and_why():
    rec = Recommendation(
        CANDIDATES[0],
        2000,
        8,
        1,
        4096,
        10.0,
        812.4,
        3,
        400 * 1024**2,
        420 * 1024**2,
        why="objective latency: kv_bits=8 max_batch=1 max_context=4096 gave ttft p95 812 ms",
    )
    recorded = {
        "kind": "recorded",
        "source": "/cfg/workload.jsonl",
        "shapes": 40,
        "replayed": 16,
        "max_concurrency": 4,
        "digest": "sha256:ab",
    }
    text = render_terminal(report(rec=rec, inputs={**INPUTS, "objective": "latency", "workload": recorded}))
    assert "objective:         latency\n" in text
    assert "workload:          recorded (16 of 40 shapes from /cfg/workload.jsonl, concurrency up to 4)\n" in text
    assert "why:               objective latency: kv_bits=8 max_batch=1" in text
    assert "  memory_peak:       420 MiB (estimate 400 MiB, -4.8%)\n" in text
    default = render_terminal(report(inputs={**INPUTS, "objective": "throughput", "workload": {"kind": "synthetic"}}))
    assert "objective:" not in default and "why:" not in default


def test_speculation_joins_the_knobs_the_hash_the_block_and_the_serve_command_only_when_on():
    on = replace(REC, speculative="prompt-lookup")
    domain = recipe_domain(binary_version="0.1.0", candidate_models=CANDIDATES, chip="Apple M2 Pro", ram_gb=32, rec=on)
    assert domain["knobs"]["speculative"] == "prompt-lookup"
    speculative = report(rec=on)
    assert speculative["recipe_hash"] not in (None, PINNED_HASH) and verify_recipe_hash(speculative)
    rec = speculative["recommendation"]
    assert rec["knobs"]["speculative"] == "prompt-lookup"
    assert rec["serve_command"] == (
        "macprovider serve --model mlx-community/Qwen2.5-14B-Instruct-4bit --kv-bits 8 --max-batch 2"
        " --max-context 4096 --speculative prompt-lookup"
    )
    text = render_terminal(speculative)
    assert "  max_context_override:       4096\n  speculative:                prompt-lookup\nmeasured:\n" in text
    tampered = report(rec=on)
    tampered["recommendation"]["knobs"]["speculative"] = "off"
    assert not verify_recipe_hash(tampered)
    # off: not in the hashed domain (the pinned vector holds), not in the block or the command
    off = recipe_domain(binary_version="0.1.0", candidate_models=CANDIDATES, chip="Apple M2 Pro", ram_gb=32, rec=REC)
    assert "speculative" not in off["knobs"] and report()["recipe_hash"] == PINNED_HASH
    assert (
        "speculative" not in render_terminal(report())
        and "--speculative" not in report()["recommendation"]["serve_command"]
    )
    # a report written before the knob existed (no `speculative` in its knobs) still verifies
    older = report()
    del older["recommendation"]["knobs"]["speculative"]
    assert verify_recipe_hash(older)


def test_every_trial_names_its_speculative_mode():
    on = Trial(2, "org/m", 100, Knobs(None, 1, 100, speculative="prompt-lookup"), 64, fits=True)
    assert trial_summary(on)["knobs"]["speculative"] == "prompt-lookup"
    assert trial_summary(replace(on, knobs=Knobs(None, 1, 100)))["knobs"]["speculative"] == "off"
    assert Recommendation.from_trial(on, 100).speculative == "prompt-lookup"
