"""`macprovider ps`, `macprovider load ID`, `macprovider unload ID`: the running server's models.

They talk to the server the config describes (`host`, `port`; `--url` overrides) over HTTP: `ps` reads
`GET /v1/health` (its `models` list), `load` / `unload` post `{"model": ID}` to `/v1/macprovider/load` and
`/v1/macprovider/unload` with the API key when one is configured (MACPROVIDER_API_KEY or api_key_file).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from macprovider.commands.common import fail, user_errors

URL_HELP = "Server URL [default: http://<host>:<port> from the config]."
CONFIG_HELP = "Config file (default: MACPROVIDER_CONFIG or ~/.config/macprovider/config.yaml)."
LOAD_TIMEOUT_S = 900.0  # a load of a big model from a cold disk takes minutes


def _server(url: str | None, config: str | None) -> tuple[str, dict[str, str]]:
    """(base URL, auth headers) of the configured server."""
    from macprovider.core import config as cfg

    with user_errors():
        resolved = cfg.resolve(cli_config=config, ram_gb=0)
        key = cfg.load_api_key(resolved.settings)
    settings = resolved.settings
    if url is None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"
    return url.rstrip("/"), ({"Authorization": f"Bearer {key}"} if key else {})


def _call(method: str, url: str, headers: dict[str, str], body: Any = None, timeout: float = 10.0) -> Any:
    """The JSON answer, or exit 1 with one line: the server's error message, or that nothing answered."""
    import httpx

    try:
        response = httpx.request(method, url, headers=headers, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise fail(f"no answer from {url} ({exc.__class__.__name__}): is `macprovider serve` running?") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:200]
        raise fail(f"{url}: {response.status_code} {message}")
    return data


def _gib(value: Any) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def ps(
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the server's per-model list as JSON."),
    config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Show the running server's models: loaded or not, requests in flight, idle time, memory estimate."""
    base, headers = _server(url, config)
    health = _call("GET", base + "/v1/health", headers)
    models = health.get("models") or [] if isinstance(health, dict) else []
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    rows = [("MODEL", "STATE", "IN FLIGHT", "IDLE S", "CONTEXT", "EST GIB", "KEEP ALIVE", "ALIASES")]
    for model in models:
        keep = model.get("keep_alive_s")
        rows.append(
            (
                model["id"],
                model["state"] + (" (pinned)" if model.get("pinned") else ""),
                str(model.get("requests_in_flight", 0)),
                "-" if model.get("idle_s") is None else f"{model['idle_s']:.0f}",
                str(model.get("context_length", "")),
                _gib(model.get("memory_estimate_bytes")),
                "never" if keep is None or keep < 0 else f"{keep:g} s",
                ", ".join(model.get("aliases") or []) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def load(
    model: str = typer.Argument(..., help="A model id (or alias) the server lists."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Load a model on the running server now (as a request for it would), and leave it loaded."""
    base, headers = _server(url, config)
    entry = _call("POST", base + "/v1/macprovider/load", headers, {"model": model}, timeout=LOAD_TIMEOUT_S)
    typer.echo(f"loaded {entry['id']}")


def unload(
    model: str = typer.Argument(..., help="A model id (or alias) the server lists."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    config: str | None = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Unload a model on the running server once its requests finish (pinned models stay)."""
    base, headers = _server(url, config)
    entry = _call("POST", base + "/v1/macprovider/unload", headers, {"model": model}, timeout=LOAD_TIMEOUT_S)
    typer.echo(f"unloaded {entry['id']}")
