"""The autotune report: recommendation, terminal block, JSON document and recipe hash (docs/autotune.md#report).

Pure functions: they take what the run decided and return dicts / text; the runner prints them.

Recipe hash contract: `"sha256:" + sha256(JCS(domain)).hexdigest()` where JCS is RFC 8785 canonical JSON
(`rfc8785.dumps`) and `domain` is
`{binary_version, candidate_models, chip, knobs{kv_bits, max_concurrency_override, max_context_override},
model, ram_gb, target_context}` plus `objective` when it is not `throughput` and
`workload: {kind, digest}` when it is not `synthetic` (digest: replay.shapes_digest of the replayed shapes),
`knobs.speculative` when the recommendation turns speculative decoding on (not `off`),
and, with `--hostfile`: `knobs.parallel`, `hosts` (by rank) and `layers_per_rank` (null for
tensor).
Adding the new inputs only when they differ from the defaults keeps every hash of a default run — all
hashes made before they existed, and the pinned vectors — unchanged, while a latency run, a run on a
recorded workload, or a recipe with speculation on, can never share a hash with the default run that picked
the same knobs. It depends on the machine, the version, the inputs and the recommendation — never on
measurements.
`verify_recipe_hash` recomputes it from a JSON report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785

from macprovider.autotune.search import Infeasible, Trial

SPEC_VERSION = "1"
WIDTH = 72


@dataclass(frozen=True)
class Recommendation:
    """The winning cell: model and knobs, median aggregate throughput, p95 TTFT, replicate count."""

    model: str
    target_context: int
    kv_bits: int | None
    max_batch: int
    max_context: int
    tps_median: float
    ttft_p95_ms: float
    replicates: int
    memory_estimate_bytes: int | None = None
    peak_memory_bytes: int | None = None
    why: str | None = None  # search.explain_choice (+ the workload's prefix reuse)
    parallel: str | None = None  # with --hostfile: pipeline | tensor
    hostfile: str | None = None
    hosts: tuple[str, ...] = ()  # by rank
    layers_per_rank: tuple[int, ...] | None = None  # pipeline: decoder layers each rank holds
    speculative: str = "off"  # serve's speculative decoding mode: off | prompt-lookup

    @classmethod
    def from_trial(cls, trial: Trial, target_context: int, cluster: Any = None) -> Recommendation:
        """Build from the Stage 2 winner trial (`cluster`: the run's preflight.ClusterHosts, with --hostfile)."""
        placement: dict[str, Any] = {}
        if cluster is not None and trial.knobs.parallel:
            placement = {
                "parallel": trial.knobs.parallel,
                "hostfile": cluster.hostfile,
                "hosts": tuple(cluster.hosts),
                "layers_per_rank": trial.layers_per_rank,
            }
        return cls(
            trial.model,
            target_context,
            trial.knobs.kv_bits,
            trial.knobs.max_batch,
            trial.knobs.max_context,
            float(trial.throughput_tps or 0.0),
            float(trial.ttft_p95_ms or 0.0),
            int(trial.replicates_n or 0),
            trial.memory_estimate_bytes,
            trial.peak_memory_bytes,
            speculative=trial.knobs.speculative,
            **placement,
        )

    @property
    def knobs(self) -> dict[str, Any]:
        """Knob keys as YAML key names, so the object can be pasted into config.yaml (`parallel` only with
        --hostfile; `speculative` always, `off` included)."""
        knobs: dict[str, Any] = {
            "kv_bits": self.kv_bits,
            "max_concurrency_override": self.max_batch,
            "max_context_override": self.max_context,
            "speculative": self.speculative,
        }
        if self.parallel:
            knobs["parallel"] = self.parallel
        return knobs

    @property
    def recipe_knobs(self) -> dict[str, Any]:
        """The knobs the recipe hash covers: `knobs` without `speculative` when it is `off`, so a recipe without
        speculation hashes exactly as before the knob existed."""
        return {key: value for key, value in self.knobs.items() if not (key == "speculative" and value == "off")}

    @property
    def serve_command(self) -> str:
        """`macprovider serve --model <id> [--kv-bits N] --max-batch N --max-context N [--speculative MODE]`;
        with --hostfile `macprovider cluster serve HOSTFILE --model <id> --parallel P [--kv-bits N] --max-batch N
        --max-context N`."""
        kv = f" --kv-bits {self.kv_bits}" if self.kv_bits is not None else ""
        speculative = f" --speculative {self.speculative}" if self.speculative != "off" else ""
        knobs = f"{kv} --max-batch {self.max_batch} --max-context {self.max_context}{speculative}"
        if self.parallel:
            import shlex

            return f"macprovider cluster serve {shlex.quote(self.hostfile or 'HOSTFILE')} --model {self.model} --parallel {self.parallel}{knobs}"
        return f"macprovider serve --model {self.model}{knobs}"


def recipe_domain(
    *,
    binary_version: str,
    candidate_models: Sequence[str],
    chip: str,
    ram_gb: int,
    rec: Recommendation,
    objective: str = "throughput",
    workload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The exact object the recipe hash covers (docs/autotune.md#report, module docstring for the additions)."""
    domain: dict[str, Any] = {
        "binary_version": binary_version,
        "candidate_models": list(candidate_models),
        "chip": chip,
        "knobs": rec.recipe_knobs,
        "model": rec.model,
        "ram_gb": int(ram_gb),
        "target_context": rec.target_context,
    }
    if objective != "throughput":
        domain["objective"] = objective
    if workload is not None and workload.get("kind", "synthetic") != "synthetic":
        domain["workload"] = {"kind": workload["kind"], "digest": workload.get("digest")}
    if rec.parallel:  # --hostfile (knobs carry `parallel` too)
        domain["hosts"] = list(rec.hosts)
        domain["layers_per_rank"] = None if rec.layers_per_rank is None else list(rec.layers_per_rank)
    return domain


def recipe_hash(domain: dict[str, Any]) -> str:
    """`sha256:` + hex SHA-256 of the RFC 8785 canonical JSON of `domain`."""
    return "sha256:" + hashlib.sha256(rfc8785.dumps(domain)).hexdigest()


def verify_recipe_hash(report: dict[str, Any]) -> bool:
    """Recompute the recipe hash of a JSON report and compare; a report without recommendation has null."""
    rec = report.get("recommendation")
    if rec is None:
        return report.get("recipe_hash") is None
    domain = recipe_domain(
        binary_version=report["machine"]["binary_version"],
        candidate_models=report["inputs"]["candidate_models"],
        chip=report["machine"]["chip"],
        ram_gb=report["machine"]["ram_gb"],
        rec=Recommendation(
            rec["model"],
            rec["target_context"],
            rec["knobs"]["kv_bits"],
            rec["knobs"]["max_concurrency_override"],
            rec["knobs"]["max_context_override"],
            0,
            0,
            0,
            parallel=rec["knobs"].get("parallel"),
            hosts=tuple(rec.get("hosts") or ()),
            layers_per_rank=None if rec.get("layers_per_rank") is None else tuple(rec["layers_per_rank"]),
            speculative=rec["knobs"].get("speculative", "off"),  # reports made before the knob: off
        ),
        objective=report["inputs"].get("objective", "throughput"),
        workload=report["inputs"].get("workload"),
    )
    return recipe_hash(domain) == report.get("recipe_hash")


def build_report(
    *,
    run_id: str,
    started_at: str,
    ended_at: str,
    machine: dict[str, Any],
    inputs: dict[str, Any],
    recommendation: Recommendation | None,
    infeasible: Sequence[Infeasible],
    alternates: Sequence[str],
    db_path: str,
    exit_reason: str,
    partial: bool = False,
    applied: bool = False,
    trials: Sequence[Trial] = (),
) -> dict[str, Any]:
    """The JSON report (stable, additive-only keys of docs/autotune.md#report, plus `partial`, `applied`, the
    recommendation's `memory_estimate_bytes` / `peak_memory_bytes` and `trials[]`: every trial's knobs,
    verdict, throughput, TTFT and memory estimate beside the measured peak, see `trial_summary`).

    `infeasible` must already be ordered smallest first.
    """
    rec_obj = None
    hash_value = None
    if recommendation is not None:
        rec_obj = {
            "model": recommendation.model,
            "target_context": recommendation.target_context,
            "knobs": recommendation.knobs,
            "tps_median": recommendation.tps_median,
            "ttft_p95_ms": recommendation.ttft_p95_ms,
            "replicates": recommendation.replicates,
            "serve_command": recommendation.serve_command,
            "memory_estimate_bytes": recommendation.memory_estimate_bytes,
            "peak_memory_bytes": recommendation.peak_memory_bytes,
            "why": recommendation.why,
        }
        if recommendation.parallel:  # --hostfile only: where it runs and how it is split
            rec_obj["hostfile"] = recommendation.hostfile
            rec_obj["hosts"] = list(recommendation.hosts)
            rec_obj["layers_per_rank"] = (
                None if recommendation.layers_per_rank is None else list(recommendation.layers_per_rank)
            )
        hash_value = recipe_hash(
            recipe_domain(
                binary_version=machine["binary_version"],
                candidate_models=inputs["candidate_models"],
                chip=machine["chip"],
                ram_gb=machine["ram_gb"],
                rec=recommendation,
                objective=inputs.get("objective", "throughput"),
                workload=inputs.get("workload"),
            )
        )
    return {
        "spec_version": SPEC_VERSION,
        "run_id": run_id,
        "started_at": started_at,
        "ended_at": ended_at,
        "machine": dict(machine),
        "inputs": dict(inputs),
        "recommendation": rec_obj,
        "alternates": list(alternates),
        "infeasible": [{"model": i.model, "rank": i.rank, "reason": i.reason} for i in infeasible],
        "recipe_hash": hash_value,
        "db_path": db_path,
        "exit_reason": exit_reason,
        "partial": partial,
        "applied": applied,
        "trials": [trial_summary(t) for t in trials],
    }


def trial_summary(trial: Trial) -> dict[str, Any]:
    """One trial for the JSON report: stage, model, knobs (YAML key names), fits, kept, notes, tps_median,
    ttft_p95_ms, cached_prompt_tokens (prefix-cache reuse the provider reported), and the memory estimate (with its terms) beside the measured peak (autotune.memory)."""
    from macprovider.autotune.memory import relative_error

    return {
        "stage": trial.stage,
        "model": trial.model,
        "knobs": {
            "kv_bits": trial.knobs.kv_bits,
            "max_concurrency_override": trial.knobs.max_batch,
            "max_context_override": trial.knobs.max_context,
            "speculative": trial.knobs.speculative,
            **({"parallel": trial.knobs.parallel} if trial.knobs.parallel else {}),
        },
        "fits": trial.fits,
        "kept": trial.kept,
        "notes": trial.notes,
        "tps_median": trial.throughput_tps,
        "ttft_p95_ms": trial.ttft_p95_ms,
        "cached_prompt_tokens": trial.cached_prompt_tokens,
        "memory_estimate_bytes": trial.memory_estimate_bytes,
        "memory_estimate_terms": dict(trial.memory_terms) if trial.memory_terms else None,
        "peak_memory_bytes": trial.peak_memory_bytes,
        "memory_estimate_error": relative_error(trial.memory_estimate_bytes, trial.peak_memory_bytes),
        **(
            {"layers_per_rank": list(trial.layers_per_rank) if trial.layers_per_rank else None}
            if trial.knobs.parallel
            else {}
        ),
    }


def _rule(title: str | None = None) -> str:
    if title is None:
        return "=" * WIDTH
    text = f" {title} "
    left = (WIDTH - len(text)) // 2
    return "=" * left + text + "=" * (WIDTH - len(text) - left)


def _memory_line(rec: dict[str, Any]) -> list[str]:
    """`  memory_peak: <n> MiB (estimate <n> MiB, <±x.x> %)` when the trial measured both."""
    peak, est = rec.get("peak_memory_bytes"), rec.get("memory_estimate_bytes")
    if not peak or not est:
        return []
    mib = 1024**2
    return [f"  memory_peak:       {peak / mib:.0f} MiB (estimate {est / mib:.0f} MiB, {(est - peak) / peak:+.1%})"]


def _choice_lines(report: dict[str, Any]) -> list[str]:
    """`objective:` / `workload:` / `why:` lines, only when the objective or the workload is not the default
    (a default run prints docs/autotune.md#report's block unchanged)."""
    inputs, rec = report["inputs"], report["recommendation"]
    objective = inputs.get("objective", "throughput")
    workload = inputs.get("workload") or {"kind": "synthetic"}
    if objective == "throughput" and workload.get("kind", "synthetic") == "synthetic":
        return []
    lines = [f"objective:         {objective}"]
    if workload.get("kind") != "synthetic":
        lines.append(
            f"workload:          {workload['kind']} ({workload.get('replayed')} of {workload.get('shapes')} shapes"
            f" from {workload.get('source')}, concurrency up to {workload.get('max_concurrency')})"
        )
    else:
        lines.append("workload:          synthetic")
    if rec.get("why"):
        lines.append(f"why:               {rec['why']}")
    return [""] + lines


def _speculative_lines(knobs: dict[str, Any]) -> list[str]:
    """`  speculative:                MODE` when the recommendation turns speculative decoding on (a recipe
    without it prints the block unchanged)."""
    mode = knobs.get("speculative", "off")
    return [] if mode == "off" else [f"  speculative:                {mode}"]


def _placement_lines(rec: dict[str, Any]) -> list[str]:
    """With --hostfile: `  parallel:` and one `  rank N: HOST (L layers)` line per host."""
    if not rec["knobs"].get("parallel"):
        return []
    layers = rec.get("layers_per_rank") or [None] * len(rec.get("hosts") or [])
    lines = [f"  parallel:                   {rec['knobs']['parallel']}", f"hosts ({rec.get('hostfile')}):"]
    for rank, (host, count) in enumerate(zip(rec.get("hosts") or [], layers)):
        lines.append(
            f"  rank {rank}: {host}"
            + (f" ({count} layers)" if count is not None else " (tensor: every layer, 1/N of its width)")
        )
    return lines


def render_terminal(report: dict[str, Any]) -> str:
    """The terminal block of docs/autotune.md#report (RECOMMENDATION, or NO RECOMMENDATION with the reasons)."""
    rec = report["recommendation"]
    footer = f"run_id: {report['run_id']} | db: {report['db_path']}"
    target = report["inputs"]["target_context"]
    if rec is None:
        lines = [_rule("NO RECOMMENDATION"), f"exit_reason: {report['exit_reason']}"]
        if report["infeasible"]:
            lines.append(f"no candidate is feasible at target_context {target} (smallest first):")
            lines += [f"  rank {i['rank']} {i['model']}: {i['reason']}" for i in report["infeasible"]]
            lines += [
                "",
                "try a smaller --target-context, or other --candidate-models.",
            ]
        lines += ["", footer, _rule()]
        return "\n".join(lines) + "\n"
    knobs = rec["knobs"]
    kv = "unset" if knobs["kv_bits"] is None else str(knobs["kv_bits"])
    lines = [_rule("RECOMMENDATION")]
    if report.get("partial"):
        lines.append("partial:         true (--max-duration ran out in Stage 2; best so far)")
    lines += [
        f"model:           {rec['model']}",
        f"target_context:  {rec['target_context']}",
        "knobs:",
        f"  kv_bits:                    {kv}",
        f"  max_concurrency_override:   {knobs['max_concurrency_override']}",
        f"  max_context_override:       {knobs['max_context_override']}",
        *_speculative_lines(knobs),
        *_placement_lines(rec),
        "measured:",
        f"  tps_median:        {rec['tps_median']:.1f} tokens/sec",
        f"  ttft_p95:          {round(rec['ttft_p95_ms'])} ms",
        f"  replicates:        {rec['replicates']}",
        *_memory_line(rec),
        *_choice_lines(report),
        "",
        "alternates (smaller candidates from input list, not probed):",
    ]
    lines += [f"  - {alt}" for alt in report["alternates"]] or ["  - none"]
    lines += [
        "",
        "serve command (copy-paste):",
        f"  {rec['serve_command']}",
        "",
        footer,
        _rule(),
    ]
    return "\n".join(lines) + "\n"
