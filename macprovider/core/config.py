"""Configuration: one resolver, CLI flag > environment variable > YAML > built-in default (docs/configuration.md).

`resolve()` is the only place a setting's value is decided. It returns the frozen `Settings` together
with where each value came from (`cli`, `env:NAME`, `yaml:PATH`, `default`, `ram-tier`), which
`macprovider config show` prints and every preflight error quotes, e.g.

    macprovider: invalid kv_bits 7 (from env:MACPROVIDER_KV_BITS): must be 4 or 8

Values are checked here, before any model loads. Unknown YAML keys warn; YAML that does not parse fails.
The API key itself is never a setting: it comes from `MACPROVIDER_API_KEY` or a 0600 `api_key_file`
(`load_api_key`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict

from macprovider.core.errors import ConfigError
from macprovider.core.hardware import GIB, MIB

# The prompt cache holds at most this many entries (engine.engine; the memory estimate in models.memory).
PROMPT_CACHE_ENTRIES = 64

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
# How `serve` holds the weights (macprovider/engine/weights_dtype.py): auto = float32 on MLX's CPU backend when it
# fits, else (a quantized checkpoint) quantized-float32; native = as stored; quantized-float32 = quantized
# layers kept, every floating parameter (their scales and biases too) float32; or every layer dequantized /
# cast to the named dtype.
WeightsDtype = Literal["auto", "native", "float32", "float16", "bfloat16", "quantized-float32"]
WEIGHTS_DTYPES: tuple[str, ...] = get_args(WeightsDtype)
QUANTIZED_FLOAT32 = "quantized-float32"


# Speculative decoding inside the continuous batch (macprovider/engine/speculative.py): off, or drafts taken from
# each sequence's own context (prompt-lookup decoding) and verified in the batch's forward pass.
Speculative = Literal["off", "prompt-lookup"]
SPECULATIVE_MODES: tuple[str, ...] = get_args(Speculative)


# Where a forward pass on MLX's CPU device computes its exponentials (macprovider/engine/cpu_kernels.py): `auto`
# uses NumPy's vectorized exp outside Apple silicon (MLX's is scalar there), `mlx` keeps MLX's own ops.
CpuKernels = Literal["auto", "mlx"]
CPU_KERNELS: tuple[str, ...] = get_args(CpuKernels)


DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default (5 minutes)
KEEP_FOREVER = -1.0  # keep_alive -1: never unload an idle model


class ModelEntry(BaseModel):
    """One model a fleet may serve (YAML `models:` list, or `serve --model A --model B`). Knobs left None
    fall back to the top-level settings; `keep_alive` is seconds (KEEP_FOREVER = never unload when idle);
    `aliases` are other names requests may use, `*`/`?`/`[…]` globs allowed (fnmatch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    aliases: tuple[str, ...] = ()
    kv_bits: Literal[4, 8] | None = None
    max_context_override: int | None = None
    max_concurrency_override: int | None = None
    weights_dtype: WeightsDtype | None = None
    speculative: Speculative | None = None
    speculative_tokens: int | None = None
    keep_alive: float | None = None
    pinned: bool = False
    recipe_hash: str | None = None  # written by `autotune --apply`: the recipe these knobs come from


class Settings(BaseModel):
    """The resolved settings of `serve` (and the defaults autotune children inherit). Immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    models: tuple[ModelEntry, ...] = ()  # the fleet; () = the single `model`
    keep_alive: float = DEFAULT_KEEP_ALIVE_S  # default idle time before a fleet model unloads, seconds
    model_wait_timeout_s: float = 60.0  # how long a request waits for room to load its model before 503
    memory_budget_gb: float | None = None  # what the fleet may keep loaded; None = detected (hardware)
    host: str = "127.0.0.1"
    port: int = 8080
    kv_bits: Literal[4, 8] | None = None
    max_context_override: int | None = None
    max_concurrency_override: int = 1
    max_queue_depth: int = 64
    max_request_body_bytes: int = 10 * MIB
    prompt_cache_bytes: int = 1 * GIB
    # The prompt cache's disk tier (macprovider/engine/disk_cache.py): where its files live (None = the default,
    # `Paths.prompt_cache_dir`: $XDG_CACHE_HOME/macprovider/kv, else ~/.cache/macprovider/kv) and its byte
    # budget (0 turns the tier off; never more than half the free space of its disk at startup).
    prompt_cache_dir: str | None = None
    prompt_cache_disk_bytes: int = 10 * GIB
    log_level: LogLevel = "info"
    api_key_file: str | None = None
    drain_timeout_s: float = 30.0
    cors_allowed_origins: tuple[str, ...] = ()
    record_workload: bool = True  # keep the content-free request-shape record (macprovider.core.request_shapes)
    weights_dtype: WeightsDtype = "auto"
    speculative: Speculative = "off"
    speculative_tokens: int = 4  # the most draft tokens one sequence verifies per step
    cpu_kernels: CpuKernels = "auto"
    parallel: Literal["pipeline", "tensor"] | None = None
    hostfile: str | None = None  # `cluster serve`'s default HOSTFILE (autotune --hostfile --apply writes it)
    rank_timeout_s: float = 60.0


@dataclass(frozen=True)
class SettingSpec:
    """How one setting is named in each source and how its raw text is parsed and checked."""

    name: str
    env: str | None
    parse: Callable[[Any], Any]
    cli_flag: str | None = None


def _int_in(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("must be an integer")
        if isinstance(raw, str):
            raw = raw.strip()
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError("must be an integer") from None
        if isinstance(raw, float) and raw != value:
            raise ValueError("must be an integer")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def wrapped(raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "unset", "none", "null")):
            return None
        return parse(raw)

    return wrapped


def _kv_bits(raw: Any) -> int:
    value = _int_in(0)(raw) if not isinstance(raw, bool) else None
    if value not in (4, 8):
        raise ValueError("must be 4 or 8 (or unset for full-precision KV)")
    return value


def _float_min(low: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError("must be a number") from None
        if not value >= low:
            raise ValueError(f"must be >= {low:g}")
        if value == float("inf"):  # every such setting is an amount that is later multiplied or waited on
            raise ValueError("must be a finite number")
        return value

    return parse


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _text(raw: Any) -> str:
    if not isinstance(raw, (str, int)) or str(raw).strip() == "":
        raise ValueError("must be a non-empty string")
    return str(raw).strip()


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    """A parser for a setting that takes one of `choices` (case-insensitive, surrounding space ignored)."""

    def parse(raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


_log_level = _one_of(("debug", "info", "warning", "error", "critical"))


AUTO_BUDGET_FRACTION = 0.5


def choose_weights_dtype(
    setting: str, on_cpu: bool, float32_bytes: int, available_bytes: int, quantized: bool = False
) -> str | None:
    """What `serve` does to the weights for `setting` (WEIGHTS_DTYPES): None (leave them as they are), a
    dtype to dequantize and cast everything to, or QUANTIZED_FLOAT32 (keep the quantized layers, cast the
    floating parameters — scales, biases, norms — to float32, so MLX computes in float32).

    `auto` on the CPU backend: float32 when `float32_bytes` ≤ AUTO_BUDGET_FRACTION × `available_bytes`; else,
    for a `quantized` checkpoint, QUANTIZED_FLOAT32 — MLX's CPU backend computes float16 on x86 ~30× slower
    than float32 (SmolLM2-135M Q4, float16 scales: decode 0.21 tok/s as stored vs 6.7 tok/s with float32
    scales, `scripts/bench_weights_dtype.py`). engine/weights_dtype.py applies it;
    autotune's memory estimate predicts it."""
    if setting == "native":
        return None
    if setting != "auto":
        return setting
    if not on_cpu:
        return None
    if float32_bytes <= AUTO_BUDGET_FRACTION * available_bytes:
        return "float32"
    return QUANTIZED_FLOAT32 if quantized else None


_weights_dtype = _one_of(WEIGHTS_DTYPES)
_cpu_kernels = _one_of(CPU_KERNELS)


def _speculative(raw: Any) -> str:
    return "off" if raw is False else _one_of(SPECULATIVE_MODES)(raw)  # YAML 1.1 reads a bare `off` as false


def _parallel(raw: Any) -> str:
    value = str(raw).strip().lower()
    if value not in ("pipeline", "tensor"):
        raise ValueError("must be pipeline or tensor (or unset for one process)")
    return value


def _origins(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(",")]
    elif isinstance(raw, (list, tuple)):
        items = [str(part).strip() for part in raw]
    else:
        raise ValueError("must be a list of origins")
    return tuple(item for item in items if item)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _keep_alive(raw: Any) -> float:
    """Seconds (a number, or text with an `s`/`m`/`h` unit: `300`, `5m`, `1h`); -1 = never unload."""
    if isinstance(raw, bool):
        raise ValueError("must be seconds, a duration such as 5m or 1h, or -1 (never unload)")
    text = str(raw).strip().lower()
    scale = _DURATION_UNITS.get(text[-1:], None) if text else None
    try:
        value = float(text[:-1] if scale is not None else text) * (scale or 1.0)
    except ValueError:
        raise ValueError("must be seconds, a duration such as 5m or 1h, or -1 (never unload)") from None
    if value == KEEP_FOREVER:
        return KEEP_FOREVER
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be >= 0 seconds, or -1 (never unload)")
    return value


_ENTRY_KNOBS: dict[str, Callable[[Any], Any]] = {
    "kv_bits": _optional(_kv_bits),
    "max_context_override": _optional(_int_in(1, 10_000_000)),
    "max_concurrency_override": _optional(_int_in(1, 256)),
    "weights_dtype": _optional(_weights_dtype),
    "speculative": _optional(_speculative),
    "speculative_tokens": _optional(_int_in(1, 16)),
    "keep_alive": _optional(_keep_alive),
    "pinned": _bool,
    "recipe_hash": _optional(_text),
}


def _model_entry(raw: Any, index: int) -> ModelEntry:
    where = f"entry {index + 1}"
    if isinstance(raw, str):
        raw = {"id": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a model id or a mapping with `id`")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "id":
            values["id"] = _text(value)
        elif key == "aliases":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(f"{where}: aliases must be a list of names")
            values["aliases"] = tuple(n.strip() for n in names)
        elif key in _ENTRY_KNOBS:
            try:
                values[key] = _ENTRY_KNOBS[key](value)
            except ValueError as exc:
                raise ValueError(f"{where}: {key} {value!r} {exc}") from None
        else:
            known = ", ".join(["id", "aliases", *_ENTRY_KNOBS])
            raise ValueError(f"{where}: unknown key {key!r} (known: {known})")
    if "id" not in values:
        raise ValueError(f"{where} has no `id`")
    return ModelEntry(**values)


def _models(raw: Any) -> tuple[ModelEntry, ...]:
    """The fleet list: YAML entries (id or mapping), a CLI list of ids, or comma-separated ids (environment).
    Ids and aliases must be unique across the fleet."""
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, (list, tuple)):
        raise ValueError("must be a list of model entries")
    entries = tuple(_model_entry(item, index) for index, item in enumerate(raw))
    seen: set[str] = set()
    for entry in entries:
        for name in (entry.id, *entry.aliases):
            if name in seen:
                raise ValueError(f"the name {name!r} is listed twice (ids and aliases must be unique)")
            seen.add(name)
    return entries


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("model", "MACPROVIDER_MODEL", _optional(_text), "--model"),
    SettingSpec("models", "MACPROVIDER_MODELS", _models, "--model"),
    SettingSpec("keep_alive", "MACPROVIDER_KEEP_ALIVE", _keep_alive),
    SettingSpec("model_wait_timeout_s", "MACPROVIDER_MODEL_WAIT_TIMEOUT_S", _float_min(0)),
    SettingSpec("memory_budget_gb", "MACPROVIDER_MEMORY_BUDGET_GB", _optional(_float_min(0.001))),
    SettingSpec("host", "MACPROVIDER_HOST", _text, "--host"),
    SettingSpec("port", "MACPROVIDER_PORT", _int_in(1, 65535), "--port"),
    SettingSpec("kv_bits", "MACPROVIDER_KV_BITS", _optional(_kv_bits), "--kv-bits"),
    SettingSpec(
        "max_context_override", "MACPROVIDER_MAX_CONTEXT_OVERRIDE", _optional(_int_in(1, 10_000_000)), "--max-context"
    ),
    SettingSpec("max_concurrency_override", "MACPROVIDER_MAX_CONCURRENCY_OVERRIDE", _int_in(1, 256), "--max-batch"),
    SettingSpec("max_queue_depth", "MACPROVIDER_MAX_QUEUE_DEPTH", _int_in(0, 100_000)),
    SettingSpec("max_request_body_bytes", "MACPROVIDER_MAX_REQUEST_BODY_BYTES", _int_in(1024, 1 << 34)),
    SettingSpec("prompt_cache_bytes", "MACPROVIDER_PROMPT_CACHE_BYTES", _int_in(0)),
    SettingSpec("prompt_cache_dir", "MACPROVIDER_PROMPT_CACHE_DIR", _optional(_text)),
    SettingSpec("prompt_cache_disk_bytes", "MACPROVIDER_PROMPT_CACHE_DISK_BYTES", _int_in(0)),
    SettingSpec("log_level", "MACPROVIDER_LOG_LEVEL", _log_level, "--log-level"),
    SettingSpec("api_key_file", "MACPROVIDER_API_KEY_FILE", _optional(_text), "--api-key-file"),
    SettingSpec("drain_timeout_s", "MACPROVIDER_DRAIN_TIMEOUT_S", _float_min(0), "--drain-timeout"),
    SettingSpec("cors_allowed_origins", "MACPROVIDER_CORS_ALLOWED_ORIGINS", _origins),
    SettingSpec("record_workload", "MACPROVIDER_RECORD_WORKLOAD", _bool),
    SettingSpec("weights_dtype", "MACPROVIDER_WEIGHTS_DTYPE", _weights_dtype, "--weights-dtype"),
    SettingSpec("speculative", "MACPROVIDER_SPECULATIVE", _speculative, "--speculative"),
    SettingSpec("speculative_tokens", "MACPROVIDER_SPECULATIVE_TOKENS", _int_in(1, 16), "--speculative-tokens"),
    SettingSpec("cpu_kernels", "MACPROVIDER_CPU_KERNELS", _cpu_kernels),
    SettingSpec("parallel", "MACPROVIDER_PARALLEL", _optional(_parallel), "--parallel"),
    SettingSpec("hostfile", "MACPROVIDER_HOSTFILE", _optional(_text)),
    SettingSpec("rank_timeout_s", "MACPROVIDER_RANK_TIMEOUT_S", _float_min(1)),
)
SETTINGS_BY_NAME = {spec.name: spec for spec in SETTINGS}


@dataclass(frozen=True)
class Paths:
    """Where macprovider keeps its files, from `$HOME` and `$XDG_CONFIG_HOME` (docs/configuration.md)."""

    config_dir: Path
    config_file: Path
    autotune_db: Path
    cache_dir: Path = Path(".cache/macprovider")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Paths:
        env = os.environ if env is None else env
        home = Path(env.get("HOME") or Path.home())
        base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
        config_dir = base / "macprovider"
        cache_base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else home / ".cache"
        return cls(config_dir, config_dir / "config.yaml", config_dir / "autotune.sqlite", cache_base / "macprovider")

    @property
    def prompt_cache_dir(self) -> Path:
        """The default directory of the prompt cache's disk tier: `$XDG_CACHE_HOME/macprovider/kv`, else
        `~/.cache/macprovider/kv` (the XDG base directory rule for non-essential cached data)."""
        return self.cache_dir / "kv"

    @property
    def workload_file(self) -> Path:
        """The request-shape record `serve` keeps and `autotune --workload recorded` replays."""
        from macprovider.core.request_shapes import WORKLOAD_FILE_NAME

        return self.config_dir / WORKLOAD_FILE_NAME


@dataclass(frozen=True)
class ResolvedConfig:
    """`settings` plus, for every field, the source its value came from; `warnings` to print once."""

    settings: Settings
    sources: dict[str, str]
    config_path: Path | None
    warnings: tuple[str, ...] = field(default=())


def default_max_context(ram_gb: float) -> int:
    """Default max context (tokens) by physical RAM tier, docs/configuration.md: ≤12→20000, ≤24→50000, ≤48→120000."""
    if ram_gb <= 12:
        return 20_000
    if ram_gb <= 24:
        return 50_000
    if ram_gb <= 48:
        return 120_000
    return 200_000


def config_path_for(cli_config: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it was named explicitly (`--config` or `MACPROVIDER_CONFIG`)."""
    if cli_config:
        return Path(cli_config).expanduser(), True
    if env.get("MACPROVIDER_CONFIG"):
        return Path(env["MACPROVIDER_CONFIG"]).expanduser(), True
    return Paths.from_env(env).config_file, False


def read_yaml(path: Path, explicit: bool) -> dict[str, Any]:
    """Parse the YAML config. A missing default file is `{}`; a missing named file or bad YAML is ConfigError."""
    import yaml

    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.__class__.__name__}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    return data


def resolve(
    cli: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    cli_config: str | None = None,
    ram_gb: float | None = None,
) -> ResolvedConfig:
    """Resolve every setting: CLI (non-None values of `cli`, keyed by setting name) > env > YAML > default.

    `ram_gb` picks the RAM-tier default of `max_context_override` (detected when None). Raises
    ConfigError naming setting, value and source for the first invalid value.
    """
    env = os.environ if env is None else env
    cli = {key: value for key, value in (cli or {}).items() if value is not None}
    unknown_cli = set(cli) - set(SETTINGS_BY_NAME)
    if unknown_cli:
        raise ValueError(f"unknown CLI settings {sorted(unknown_cli)}")
    path, explicit = config_path_for(cli_config, env)
    yaml_values = read_yaml(path, explicit)
    warnings = [
        f"warning: unknown key {key!r} in {path} is ignored"
        for key in yaml_values
        if key not in SETTINGS_BY_NAME and key != "api_key"
    ]
    if "api_key" in yaml_values:
        warnings.append(f"warning: 'api_key' in {path} is ignored: use MACPROVIDER_API_KEY or api_key_file")

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SETTINGS:
        if spec.name in cli:
            raw, source = cli[spec.name], "cli"
        elif spec.env and env.get(spec.env) is not None:
            raw, source = env[spec.env], f"env:{spec.env}"
        elif spec.name in yaml_values:
            raw, source = yaml_values[spec.name], f"yaml:{path}"
        else:
            sources[spec.name] = "default"
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"invalid {spec.name} {raw!r} (from {source}): {exc}") from None
        sources[spec.name] = source

    if values.get("max_context_override") is None:
        from macprovider.core.hardware import physical_ram_gb

        values["max_context_override"] = default_max_context(physical_ram_gb() if ram_gb is None else ram_gb)
        sources["max_context_override"] = "ram-tier"
    if values.get("prompt_cache_dir") is None:  # shown by `config show` as the path it is
        values["prompt_cache_dir"] = str(Paths.from_env(env).prompt_cache_dir)
    else:
        values["prompt_cache_dir"] = str(Path(values["prompt_cache_dir"]).expanduser())
    settings = Settings(**values)
    return ResolvedConfig(settings, sources, path if path.exists() else None, tuple(warnings))


def fleet_entries(resolved: ResolvedConfig) -> tuple[ModelEntry, ...]:
    """The models `serve` may serve, first one first (the default model).

    `--model` given on the command line (once or repeated) or `MACPROVIDER_MODEL` names the fleet exactly;
    otherwise it is the YAML `models:` list (or `MACPROVIDER_MODELS`), with a `model:` that it does not list
    put first. A lone `model` is a fleet of one, pinned (loaded at start, never unloaded). Entries keep only
    what they set; `ServeFleet` fills the rest from the top-level settings."""
    settings, sources = resolved.settings, resolved.sources
    if sources.get("models") == "cli":
        return settings.models
    if settings.model and (sources.get("model") == "cli" or sources.get("model", "").startswith("env:")):
        return (ModelEntry(id=settings.model, pinned=True),)
    entries = settings.models
    if settings.model and all(settings.model not in (entry.id, *entry.aliases) for entry in entries):
        entries = (ModelEntry(id=settings.model, pinned=not entries),) + entries
    return entries


def load_api_key(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The API key from `MACPROVIDER_API_KEY`, else from `api_key_file` (must be mode 0600 or stricter).

    Raises ConfigError when the file is missing, unreadable, empty or readable by group/others.
    """
    env = os.environ if env is None else env
    if env.get("MACPROVIDER_API_KEY"):
        return env["MACPROVIDER_API_KEY"].strip()
    if not settings.api_key_file:
        return None
    path = Path(settings.api_key_file).expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        raise ConfigError(f"invalid api_key_file {str(path)!r}: file does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"invalid api_key_file {str(path)!r}: mode {oct(mode & 0o777)} must be 0600 (chmod 600)")
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ConfigError(f"invalid api_key_file {str(path)!r}: file is empty")
    return key


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` binds only the loopback interface (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
