"""One trial for real, and the progress display (docs/autotune.md#trials, #memory-estimate, #report).

`RealEvaluator(model, knobs, stage) -> Trial`: pre-warm (download + integrity check) → memory pre-check
(rejects hopeless candidates from safetensors headers, without loading) → a `macprovider serve` child with
the trial's knobs → the probe workload → a feasibility verdict. `Progress` is the rich display on stderr and
the `-v` per-trial lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from macprovider.autotune import memory
from macprovider.autotune.memory import MIB
from macprovider.autotune.preflight import AutotuneInputs, ClusterHosts
from macprovider.autotune.provider import (
    CandidateProvider,
    Deadline,
    DeadlineReached,
    ProviderExited,
    ProviderTimeout,
    serve_args,
)
from macprovider.autotune.search import BudgetExhausted, Interrupted, Knobs, Trial, knobs_text
from macprovider.core.cluster.parallel import check_split, failed_rank_line, launch_argv, layers_per_rank
from macprovider.core.errors import ConfigError

BASELINE_CACHE_NAME = "runtime-baseline.json"  # in the config directory, beside autotune.sqlite


class Progress:
    """A rich progress display on stderr while the run goes, and `-v` per-trial lines."""

    def __init__(self, err: TextIO, verbose: bool, total_hint: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.console = Console(file=err, stderr=err is sys.stderr)
        self.verbose = verbose
        self.progress = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("autotune", total=total_hint)

    def __enter__(self) -> Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def started(self, model: str, knobs: Knobs, stage: int) -> None:
        self.progress.update(self.task, description=f"stage {stage}: {model} {knobs_text(knobs)}")

    def ended(self, trial: Trial) -> None:
        self.progress.advance(self.task)
        if self.verbose:
            kv = "unset" if trial.knobs.kv_bits is None else trial.knobs.kv_bits
            tps = f"{trial.throughput_tps:.1f} tok/s" if trial.throughput_tps is not None else "- tok/s"
            ttft = f"{trial.ttft_p95_ms:.0f} ms" if trial.ttft_p95_ms is not None else "- ms"
            verdict = "feasible" if trial.fits else f"infeasible: {trial.notes}"
            mem = ""
            if trial.memory_estimate_bytes is not None:
                peak = "-" if trial.peak_memory_bytes is None else f"{trial.peak_memory_bytes / MIB:.0f}"
                error = memory.relative_error(trial.memory_estimate_bytes, trial.peak_memory_bytes)
                mem = f", memory est {trial.memory_estimate_bytes / MIB:.0f} MiB / peak {peak} MiB" + (
                    f" ({error:+.1%})" if error is not None else ""
                )
            self.console.print(
                f"[stage {trial.stage}] {trial.model} kv_bits={kv} max_batch={trial.knobs.max_batch} "
                f"max_context={trial.knobs.max_context}{split_text(trial)}{speculative_text(trial)}: {tps}, "
                f"ttft p95 {ttft}{mem} -> {verdict}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def split_text(trial: Trial) -> str:
    """` parallel=pipeline layers=15+15` for a --hostfile trial, "" otherwise."""
    if not trial.knobs.parallel:
        return ""
    layers = f" layers={'+'.join(map(str, trial.layers_per_rank))}" if trial.layers_per_rank else ""
    return f" parallel={trial.knobs.parallel}{layers}"


def speculative_text(trial: Trial) -> str:
    """` speculative=prompt-lookup` for a trial with speculative decoding on, "" otherwise."""
    return f" speculative={trial.knobs.speculative}" if trial.knobs.speculative != "off" else ""


def make_workload(model_dir: Path, inputs: AutotuneInputs) -> Any:
    """The probe workload of `--workload`: the synthetic prompt (probe.Workload) or a replay of the recorded
    / file shapes (replay.ReplayWorkload). ValueError when the model's tokenizer cannot be loaded."""
    from macprovider.autotune import probe

    if inputs.workload_kind == "synthetic":
        return probe.Workload(model_dir, inputs.target_context)
    from macprovider.autotune.replay import ReplayWorkload

    return ReplayWorkload(
        model_dir, inputs.target_context, inputs.workload_shapes, inputs.workload_kind, inputs.workload_source or ""
    )


def pinned_fleet_bytes(config_path: Path, except_model: str) -> int:
    """The memory (`models.memory.resident_bytes`, bytes) of the pinned models in the fleet that `config_path`
    lists, other than `except_model`: a model `--apply` adds to that fleet will sit beside them. A config that
    cannot be read, or a pinned model not in the local cache, counts 0 (serve's own preflight reports it)."""
    from macprovider.core import config as cfg
    from macprovider.core.errors import MacproviderError
    from macprovider.models.ids import ensure_local
    from macprovider.models.memory import resident_bytes

    try:
        resolved = cfg.resolve(cli_config=str(config_path), ram_gb=0)
    except (MacproviderError, OSError):
        return 0
    settings = resolved.settings
    total = 0
    for entry in cfg.fleet_entries(resolved):
        if not entry.pinned or entry.id == except_model or len(settings.models) == 0:
            continue
        try:
            total += resident_bytes(
                ensure_local(entry.id),
                max_context=entry.max_context_override or settings.max_context_override or 1,
                max_batch=entry.max_concurrency_override or settings.max_concurrency_override,
                kv_bits=entry.kv_bits if entry.kv_bits is not None else settings.kv_bits,
                prompt_cache_bytes=settings.prompt_cache_bytes,
                weights_dtype=entry.weights_dtype or settings.weights_dtype,
            )
        except (MacproviderError, OSError, ValueError, KeyError, TypeError):
            continue
    return total


class RealEvaluator:
    """Trial = pre-warm → memory pre-check → `macprovider serve` child → probe
    (docs/autotune.md#stage-1-the-biggest-model, #memory-estimate)."""

    def __init__(self, inputs: AutotuneInputs, deadline: Deadline, budget: Callable[[], int]) -> None:
        self.inputs = inputs
        self.deadline = deadline
        self._budget_fn = budget
        self._budget: int | None = inputs.memory_budget_bytes
        self._paths: dict[str, Path] = {}
        self._workloads: dict[str, Any] = {}
        self._baseline: int | None = None
        self._pinned: dict[str, int] = {}

    def budget_beside_pinned(self, model: str) -> int:
        """The budget left for `model` (bytes): with `--apply` into a config that lists a fleet, the pinned
        models it will be served beside are taken off."""
        if not self.inputs.apply:
            return self.budget()
        if model not in self._pinned:
            self._pinned[model] = pinned_fleet_bytes(self.inputs.config_path, model)
        return self.budget() - self._pinned[model]

    def baseline(self) -> int:
        """The runtime baseline (memory.runtime_baseline_bytes), measured once per machine and cached."""
        if self._baseline is None:
            from macprovider.core.config import Paths

            self._baseline = memory.runtime_baseline_bytes(Paths.from_env().config_dir / BASELINE_CACHE_NAME)
        return self._baseline

    def budget(self) -> int:
        if self._budget is None:
            self._budget = int(self._budget_fn())
        return self._budget

    def __call__(self, model: str, knobs: Knobs, stage: int) -> Trial:
        from macprovider.autotune import probe
        from macprovider.autotune.prewarm import PrewarmIntegrity, PrewarmTransient, PrewarmUnusable, prewarm

        inputs = self.inputs
        base = Trial(stage, model, inputs.target_context, knobs, probe.MAX_TOKENS, fits=False)
        if self.deadline.expired:
            raise BudgetExhausted(replace(base, notes="--max-duration ran out before this trial started"))
        try:
            path = self._paths.get(model) or prewarm(model)
        except PrewarmTransient as exc:
            return replace(base, notes=f"pre-warm transient: {exc}", failure_class="transient")
        except PrewarmUnusable as exc:
            return replace(base, notes=f"pre-warm failed: {exc}", failure_class="infeasible")
        except PrewarmIntegrity as exc:
            return replace(base, notes=f"pre-warm integrity failure: {exc}", failure_class="integrity")
        except KeyboardInterrupt:
            raise Interrupted(replace(base, notes="interrupted during pre-warm")) from None
        self._paths[model] = path

        try:
            workload = self._workloads.get(model) or make_workload(path, inputs)
        except ValueError as exc:
            return replace(base, notes=f"cannot build the probe prompt: {exc}", failure_class="infeasible")
        self._workloads[model] = workload

        cluster = inputs.cluster if knobs.parallel else None
        layers: list[int] | None = None
        if cluster is not None:
            try:
                layers = self.split(model, path, knobs.parallel, cluster)  # type: ignore[arg-type]
            except ConfigError as exc:
                return replace(base, notes=str(exc), failure_class="infeasible")
            base = replace(base, layers_per_rank=None if layers is None else tuple(layers))

        replicates = inputs.stage1_replicates if stage == 1 else inputs.stage2_replicates
        base, ending = self._memory_precheck(base, model, path, knobs, cluster, layers, workload, replicates)
        if ending is not None:
            return ending
        return self._probe(base, model, knobs, cluster, workload, replicates, stage)

    def _memory_precheck(
        self,
        base: Trial,
        model: str,
        path: Path,
        knobs: Knobs,
        cluster: ClusterHosts | None,
        layers: list[int] | None,
        workload: Any,
        replicates: int,
    ) -> tuple[Trial, Trial | None]:
        """The memory pre-check: `(base with the estimate's fields, None)` to go on and probe, or
        `(base, infeasible trial)` when the estimate (or a rank's share of it) does not fit."""
        from macprovider.models.ids import read_model_config

        estimate = None
        try:
            estimate = memory.estimate(
                path,
                read_model_config(path),
                max_context=knobs.max_context,
                max_batch=knobs.max_batch,
                kv_bits=knobs.kv_bits,
                budget=self.budget_beside_pinned(model),
                baseline=self.baseline(),
                cached_tokens=workload.cached_tokens(knobs.max_context, knobs.max_batch, replicates),
                **workload.memory_shape(),
            )
            if cluster is not None:
                shares = memory.rank_estimates(
                    estimate,
                    memory.rank_weight_fractions(path, knobs.parallel, layers or [0] * len(cluster.hosts)),  # type: ignore[arg-type]
                    layers,
                    cluster.budgets,
                )
                over = next((r for r, share in enumerate(shares) if not share.fits), None)
                if over is not None:
                    note = f"rank {over} ({cluster.hosts[over]}): {shares[over].note()}"
                    return base, replace(
                        base,
                        notes=note,
                        failure_class="infeasible",
                        memory_estimate_bytes=shares[0].total,
                        weights_bytes=estimate.weights,
                        memory_terms=shares[over].terms(),
                    )
                estimate = shares[0]  # rank 0's share: the rank whose peak the probe measures
        except (ValueError, KeyError, OSError, TypeError):
            estimate = None  # cannot estimate: measure instead of guessing
        est_fields: dict[str, Any] = {}
        if estimate is not None:
            est_fields = {
                "memory_estimate_bytes": estimate.total,
                "weights_bytes": estimate.weights,
                "memory_terms": estimate.terms(),
            }
            if not estimate.fits:
                return base, replace(base, notes=estimate.note(), failure_class="infeasible", **est_fields)
        return replace(base, **est_fields), None

    def _probe(
        self,
        base: Trial,
        model: str,
        knobs: Knobs,
        cluster: ClusterHosts | None,
        workload: Any,
        replicates: int,
        stage: int,
    ) -> Trial:
        """Start the candidate provider with `knobs`, probe it, and judge the measurement into a Trial."""
        from macprovider.autotune import probe

        inputs = self.inputs
        provider = CandidateProvider(
            model,
            inputs.port,
            max_batch=knobs.max_batch,
            max_context=knobs.max_context,
            kv_bits=knobs.kv_bits,
            speculative=knobs.speculative,
            drain_grace=inputs.drain_grace_s,
            deadline=self.deadline,
            **(self.launch(model, knobs, cluster) if cluster is not None else {}),
        )
        try:
            with provider:
                provider.wait_ready()
                m = probe.measure(
                    provider.base_url,
                    model,
                    workload,
                    max_batch=knobs.max_batch,
                    replicates=replicates,
                    gate_ttft_ms=inputs.gate_ttft_ms,
                    deadline=self.deadline,
                    seed=stage * 1000,
                )
                died = None if provider.alive() else provider.proc.returncode if provider.proc else None
                tail = failed_rank_line(provider.stderr_text()) or provider.stderr_tail(lines=3)
        except ProviderExited as exc:
            hint = " (killed by a signal: out of memory?)" if (exc.returncode or 0) < 0 else ""
            return replace(
                base,
                notes=f"provider exited with code {exc.returncode} while loading{hint}: "
                f"{failed_rank_line(provider.stderr_text()) or exc.stderr_tail}",
                failure_class="infeasible",
            )
        except ProviderTimeout as exc:
            return replace(base, notes=f"pre-warm transient: load timeout: {exc}", failure_class="transient")
        except DeadlineReached as exc:
            raise BudgetExhausted(replace(base, notes=f"budget exhausted: {exc}")) from None
        except KeyboardInterrupt:
            raise Interrupted(replace(base, notes="interrupted")) from None

        fits, reason = probe.judge(m, inputs.gate_ttft_ms, replicates * workload.requests_per_round(knobs.max_batch))
        if died is not None:
            fits, reason = False, f"provider exited with code {died} during the probe: {tail}"
        elif m.errors and tail:
            reason = f"{reason} (provider stderr: {tail})"
        return replace(
            base,
            fits=fits,
            notes=reason,
            failure_class="none" if fits else "infeasible",
            measured_prompt_tokens=m.prompt_tokens,
            throughput_tps=m.tps_median,
            ttft_p95_ms=m.ttft_p95_ms,
            n_err=len(m.errors),
            cached_prompt_tokens=m.cached_tokens,
            replicates_n=m.replicates,
            mlx_peak_memory_bytes=m.peak_memory_bytes,
            peak_memory_bytes=None if m.peak_memory_bytes is None else m.peak_memory_bytes + self.baseline(),
        )

    def split(self, model: str, path: Path, parallel: str, cluster: ClusterHosts) -> list[int] | None:
        """Layers per rank (pipeline, sized by the hosts' budgets) or None (tensor). Raises ConfigError with
        `macprovider.core.cluster.parallel.check_split`'s refusal when the mode cannot split this model over the hosts."""
        from macprovider.models.ids import read_model_config

        config = read_model_config(path)
        check_split(config, len(cluster.hosts), parallel, model)
        if parallel != "pipeline":
            return None
        return layers_per_rank(memory.ModelShape.from_config(config).layers, cluster.budgets)

    def launch(self, model: str, knobs: Knobs, cluster: ClusterHosts) -> dict[str, Any]:
        """CandidateProvider arguments that run the candidate on every host: `mlx.launch` with the hostfile
        (`macprovider.core.cluster.parallel.launch_argv`, what `cluster serve` runs), HTTP on rank 0's host. Every rank
        reads `/dev/null` as its config (the trial's flags are the only knobs, on remote hosts too)."""
        rank0 = cluster.hosts[0]
        local = rank0 in ("127.0.0.1", "localhost")
        args = serve_args(
            self.inputs.port,
            max_batch=knobs.max_batch,
            max_context=knobs.max_context,
            kv_bits=knobs.kv_bits,
            config_path=Path(os.devnull),
            speculative=knobs.speculative,
            host="127.0.0.1" if local else "0.0.0.0",
        )
        argv = launch_argv(cluster.hostfile, model, knobs.parallel or "pipeline", args, sys.executable, cluster.backend)
        return {"argv": argv, "host": "127.0.0.1" if local else rank0}
