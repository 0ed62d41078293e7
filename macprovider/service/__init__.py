"""Running `macprovider serve` as a service (docs/architecture.md#service): launchd on macOS, a systemd user
unit on Linux.

Layout:
    spec.py      ServiceSpec and its two renderers (LaunchAgent plist, systemd unit), paths, status parsing
    managers.py  install / uninstall / start / stop / restart / status through an injected command Runner
Imports: the shared core only. Importers: `commands.service`, `autotune.conflict` (launchd helpers).
"""
