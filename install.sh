#!/usr/bin/env bash
# install.sh: set macprovider up for this user in one command (docs/architecture.md#service). Never needs root.
#
#   bash install.sh                 install from the checkout this script sits in
#   bash install.sh --version 0.1.0 install that version from PyPI
#
# What it does (each step is skipped when already done, so a second run changes nothing):
#   1. finds python3 >= 3.11 and creates a virtual environment in ${XDG_DATA_HOME:-~/.local/share}/macprovider/venv
#   2. installs the macprovider package into it (from this checkout, or `--version X` from PyPI)
#   3. links ~/.local/bin/macprovider to it
#   4. writes a commented default config to ${XDG_CONFIG_HOME:-~/.config}/macprovider/config.yaml if none exists
#      (an existing config is never touched)
#   5. installs the service (launchd LaunchAgent on macOS, systemd user unit on Linux) unless --no-service,
#      once the config names a model; skipped with a message where no service manager runs
#
# Options:
#   --version X               install macprovider==X from PyPI instead of this checkout
#   --no-service              do not install the launchd / systemd service
#   --python PATH             the interpreter to build the environment from (default: first python3.13,
#                             python3.12, python3.11, python3 on PATH that is >= 3.11; or $MACPROVIDER_PYTHON)
#   --system-site-packages    let the environment see the interpreter's installed packages (reuse wheels)
#   --allow-root              run even as root (CI containers); a normal install never needs root
#   -h, --help                show this help
#
# Environment: MACPROVIDER_PIP_ARGS   extra arguments for pip install (e.g. "--no-index --find-links DIR")
#              MACPROVIDER_PYTHON     the interpreter, as --python
#              MACPROVIDER_CONFIG     the config file to create / serve with
#
# Exit codes:
#   0  installed, or already up to date
#   1  install failure (virtual environment, pip, link, config or service step)
#   2  usage error (unknown option, missing value)
#   3  unsupported platform (needs macOS on Apple Silicon, or Linux x86_64 / aarch64)
#   4  missing tool: no python3 >= 3.11 with the venv module found
#   5  running as root without --allow-root
set -euo pipefail

EXIT_FAILURE=1
EXIT_USAGE=2
EXIT_PLATFORM=3
EXIT_MISSING_TOOL=4
EXIT_ROOT=5

say() { printf 'install.sh: %s\n' "$*"; }
die() { local code=$1; shift; printf 'install.sh: error: %s\n' "$*" >&2; exit "$code"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

VERSION=""
NO_SERVICE=0
ALLOW_ROOT=0
SYSTEM_SITE=0
PYTHON_OPT="${MACPROVIDER_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --version) [ $# -ge 2 ] && [ -n "$2" ] || die $EXIT_USAGE "--version needs a value, e.g. --version 0.1.0"
               VERSION=$2; shift 2 ;;
    --version=*) VERSION=${1#--version=}; [ -n "$VERSION" ] || die $EXIT_USAGE "--version needs a value"; shift ;;
    --python) [ $# -ge 2 ] && [ -n "$2" ] || die $EXIT_USAGE "--python needs a path"
              PYTHON_OPT=$2; shift 2 ;;
    --python=*) PYTHON_OPT=${1#--python=}; shift ;;
    --no-service) NO_SERVICE=1; shift ;;
    --system-site-packages) SYSTEM_SITE=1; shift ;;
    --allow-root) ALLOW_ROOT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die $EXIT_USAGE "unknown option '$1' (see --help)" ;;
  esac
done
if [ -n "$VERSION" ] && ! [[ "$VERSION" =~ ^[0-9A-Za-z.+!_-]+$ ]]; then
  die $EXIT_USAGE "invalid --version '$VERSION': expected a version such as 0.1.0"
fi

# ---- who and where ---------------------------------------------------------------------------------
if [ "$(id -u)" = "0" ] && [ "$ALLOW_ROOT" = "0" ]; then
  die $EXIT_ROOT "refusing to run as root: macprovider installs per user (no sudo needed); pass --allow-root to override"
fi
[ -n "${HOME:-}" ] || die $EXIT_FAILURE "HOME is not set"

OS=$(uname -s)
ARCH=$(uname -m)
case "$OS/$ARCH" in
  Darwin/arm64) MANAGER=launchd ;;
  Darwin/*)
    if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = "1" ]; then
      die $EXIT_PLATFORM "this shell runs under Rosetta (x86_64): run install.sh from a native arm64 terminal"
    fi
    die $EXIT_PLATFORM "unsupported platform $OS/$ARCH: MLX needs a Mac with Apple Silicon" ;;
  Linux/x86_64|Linux/aarch64|Linux/arm64) MANAGER=systemd ;;
  *) die $EXIT_PLATFORM "unsupported platform $OS/$ARCH: macprovider runs on macOS (Apple Silicon) and Linux (x86_64, aarch64)" ;;
esac

DATA_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/macprovider"
VENV="$DATA_DIR/venv"
STATE_FILE="$DATA_DIR/install-state"
BIN_DIR="$HOME/.local/bin"
CONFIG_FILE="${MACPROVIDER_CONFIG:-${XDG_CONFIG_HOME:-$HOME/.config}/macprovider/config.yaml}"
SRC=""
if [ -z "$VERSION" ] && [ -n "${BASH_SOURCE[0]:-}" ] && [ -f "${BASH_SOURCE[0]}" ]; then
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [ -f "$here/pyproject.toml" ] && grep -q '^name = "macprovider"' "$here/pyproject.toml"; then
    SRC=$here
  fi
fi
CHANGED=0

# ---- 1. python and the virtual environment ---------------------------------------------------------
python_ok() {  # usable: >= 3.11 with venv + ensurepip (Debian splits them into python3.X-venv)
  "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}
find_python() {
  local candidate
  if [ -n "$PYTHON_OPT" ]; then
    candidate=$(command -v "$PYTHON_OPT" 2>/dev/null || true)
    if [ -n "$candidate" ] && python_ok "$candidate"; then echo "$candidate"; return 0; fi
    return 1
  fi
  for name in python3.13 python3.12 python3.11 python3; do
    candidate=$(command -v "$name" 2>/dev/null || true)
    if [ -n "$candidate" ] && python_ok "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
  say "reusing the environment $VENV"
else
  if ! PYTHON=$(find_python); then
    if [ -n "$PYTHON_OPT" ]; then
      die $EXIT_MISSING_TOOL "'$PYTHON_OPT' is not a python >= 3.11 with the venv module"
    fi
    hint="install Python 3.11 or newer"
    [ "$OS" = Darwin ] && hint="$hint (e.g. \`brew install python@3.12\` or python.org)"
    [ "$OS" = Linux ] && hint="$hint with its venv module (e.g. \`sudo apt install python3.11-venv\`)"
    die $EXIT_MISSING_TOOL "no python3 >= 3.11 with the venv module found on PATH: $hint, or pass --python PATH"
  fi
  [ -e "$VENV" ] && rm -rf "$VENV"  # a broken environment of ours: rebuild it
  say "creating the environment $VENV with $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
  mkdir -p "$DATA_DIR"
  venv_args=()
  [ "$SYSTEM_SITE" = "1" ] && venv_args+=(--system-site-packages)
  "$PYTHON" -m venv "${venv_args[@]+"${venv_args[@]}"}" "$VENV" || die $EXIT_FAILURE "could not create the environment $VENV"
  CHANGED=1
fi
VPY="$VENV/bin/python"

# ---- 2. the package ----------------------------------------------------------------------------------
# shellcheck disable=SC2206  # MACPROVIDER_PIP_ARGS is deliberately word-split
PIP_ARGS=(${MACPROVIDER_PIP_ARGS:-})
fingerprint() {  # what was installed: the checkout's files (or the requested version) and the pip arguments
  "$VPY" - "$SRC" "$VERSION" "${PIP_ARGS[@]+"${PIP_ARGS[@]}"}" <<'PY'
import hashlib, os, sys
src, version, pip_args = sys.argv[1], sys.argv[2], sys.argv[3:]
digest = hashlib.sha256(repr((version, pip_args)).encode())
if src:
    paths = [os.path.join(src, "pyproject.toml"), os.path.join(src, "README.md")]
    for root, dirs, files in os.walk(os.path.join(src, "macprovider")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        paths += [os.path.join(root, f) for f in sorted(files) if not f.endswith((".pyc", ".pyo"))]
    for path in paths:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, src).encode() + b"\0")
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
print(digest.hexdigest())
PY
}
if [ -n "$SRC" ]; then TARGET="$SRC"; WHAT="macprovider from $SRC"
elif [ -n "$VERSION" ]; then TARGET="macprovider==$VERSION"; WHAT="macprovider $VERSION from PyPI"
else TARGET="macprovider"; WHAT="macprovider from PyPI"
fi
WANT=$(fingerprint) || die $EXIT_FAILURE "the environment's python does not run: remove $VENV and run install.sh again"
HAVE=$(cat "$STATE_FILE" 2>/dev/null || true)
if [ "$WANT" = "$HAVE" ] && "$VENV/bin/macprovider" --version >/dev/null 2>&1; then
  say "$WHAT is already installed: $("$VENV/bin/macprovider" --version)"
else
  say "installing $WHAT and its dependencies (MLX, mlx-lm, ...): this can take a minute"
  if ! "$VPY" -m pip install --disable-pip-version-check -q "${PIP_ARGS[@]+"${PIP_ARGS[@]}"}" "$TARGET"; then
    die $EXIT_FAILURE "pip could not install $WHAT (see its output above); fix the cause and run install.sh again"
  fi
  "$VENV/bin/macprovider" --version >/dev/null 2>&1 || die $EXIT_FAILURE "macprovider was installed but does not run: see \`$VENV/bin/macprovider --version\`"
  printf '%s\n' "$WANT" >"$STATE_FILE"
  say "installed $("$VENV/bin/macprovider" --version)"
  CHANGED=1
fi

# ---- 3. the command on PATH --------------------------------------------------------------------------
mkdir -p "$BIN_DIR"
LINK="$BIN_DIR/macprovider"
if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$VENV/bin/macprovider" ]; then
  :
elif [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
  die $EXIT_FAILURE "$LINK exists and is not a link to this install: remove it (or rename it) and run install.sh again"
else
  ln -sfn "$VENV/bin/macprovider" "$LINK" || die $EXIT_FAILURE "could not link $LINK"
  say "linked $LINK -> $VENV/bin/macprovider"
  CHANGED=1
fi

# ---- 4. the config (never overwritten) ---------------------------------------------------------------
if [ -e "$CONFIG_FILE" ]; then
  say "keeping the existing config $CONFIG_FILE"
else
  mkdir -p "$(dirname "$CONFIG_FILE")"
  tmp_config="$CONFIG_FILE.tmp.$$"
  cat >"$tmp_config" <<'YAML'
# macprovider configuration. Every key is optional; a commented key keeps its default.
# Precedence for every setting: CLI flag > environment variable > this file > built-in default.
# `macprovider config show` prints the resolved values and where each came from.
# `macprovider autotune --apply` sets model, kv_bits, max_context_override and
# max_concurrency_override here and leaves every other line as it is.

# The model to serve: a Hugging Face id (org/name; `macprovider models pull ID` downloads it)
# or a local directory. A real small model to try: `macprovider models demo`, then use
# model: macprovider-demo/smollm2-135m
# model: mlx-community/Llama-3.2-3B-Instruct-4bit

# Where the OpenAI-compatible endpoint listens (http://127.0.0.1:8080/v1). A non-loopback host
# needs an API key (MACPROVIDER_API_KEY or api_key_file).
# host: 127.0.0.1
# port: 8080

# KV-cache quantization: 4 or 8 bits; unset = full precision.
# kv_bits: 8
# Largest prompt + generation per request, in tokens [default: by RAM, capped by the model].
# max_context_override: 50000
# Sequences decoded together (continuous batching); requests beyond queue up to 2x this.
# max_concurrency_override: 1

# Largest request body, in bytes [10 MiB].
# max_request_body_bytes: 10485760
# debug, info, warning, error or critical.
# log_level: info
# A file (mode 0600) holding the API key; never put the key itself in this file.
# api_key_file: ~/.config/macprovider/api_key
# Seconds in-flight requests may finish after SIGTERM.
# drain_timeout_s: 30
YAML
  mv "$tmp_config" "$CONFIG_FILE"
  say "wrote a default config $CONFIG_FILE"
  CHANGED=1
fi

# ---- 5. the service ------------------------------------------------------------------------------------
SERVICE_NOTE=""
config_has_model() {
  "$VPY" - "$CONFIG_FILE" <<'PY' >/dev/null 2>&1
import sys, yaml
data = yaml.safe_load(open(sys.argv[1], encoding="utf-8")) or {}
sys.exit(0 if isinstance(data, dict) and data.get("model") else 1)
PY
}
if [ "$NO_SERVICE" = "1" ]; then
  SERVICE_NOTE="service: not installed (--no-service); later: macprovider service install"
elif [ "$MANAGER" = "systemd" ] && { ! command -v systemctl >/dev/null 2>&1 || ! systemctl --user show-environment >/dev/null 2>&1; }; then
  SERVICE_NOTE="service: skipped, no systemd user session here (containers, some ssh logins); run \`macprovider serve\` in the foreground, or \`loginctl enable-linger \$USER\` then \`macprovider service install\`"
elif ! config_has_model; then
  SERVICE_NOTE="service: not installed yet, the config names no model; after \`macprovider autotune --apply\` run \`macprovider service install\`"
else
  current=$([ "$MANAGER" = launchd ] && echo "$HOME/Library/LaunchAgents/live.streamvc.macprovider.plist" \
            || echo "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/macprovider.service")
  rendered=$("$VENV/bin/macprovider" service print --manager "$MANAGER" --config "$CONFIG_FILE" 2>/dev/null) \
    || die $EXIT_FAILURE "could not render the service file (\`macprovider service print --manager $MANAGER\`)"
  if [ -f "$current" ] && [ "$(cat "$current")" = "$rendered" ]; then
    SERVICE_NOTE="service: unchanged ($current)"
  else
    "$VENV/bin/macprovider" service install --manager "$MANAGER" --config "$CONFIG_FILE" \
      || die $EXIT_FAILURE "the service could not be installed (see above); retry with \`macprovider service install\`, or skip it with --no-service"
    SERVICE_NOTE="service: installed ($MANAGER)"
    CHANGED=1
  fi
fi
say "$SERVICE_NOTE"

# ---- next steps ----------------------------------------------------------------------------------------
if [ "$CHANGED" = "0" ]; then
  say "nothing to change: macprovider is installed and up to date"
  exit 0
fi
case ":$PATH:" in
  *":$BIN_DIR:"*) path_hint="" ;;
  *) path_hint="  add $BIN_DIR to PATH:          echo 'export PATH=\"$BIN_DIR:\$PATH\"' >> ~/.$(basename "${SHELL:-bash}")rc" ;;
esac
cat <<EOF

macprovider is installed: $("$VENV/bin/macprovider" --version)
Next steps:
${path_hint:+$path_hint
}  try a real small model:         macprovider models demo && macprovider serve --model macprovider-demo/smollm2-135m
  find the biggest model and the best knobs for this machine, and save them:
                                  macprovider autotune --apply
  then run it in the background:  macprovider service install      (status: macprovider service status)
  config:                         $CONFIG_FILE   (macprovider config show)
EOF
