#!/usr/bin/env bash
# Install smoke test: does `pip install .` (the wheel, no extras, no source tree) give a
# working sparkctl and REST service? Builds the wheel from the tracked and untracked files,
# installs it into a fresh virtualenv (~6 GB, from pip's configured local wheels and cache),
# then, from a folder outside the repository: `sparkctl --help`, `sparkctl validate` of the
# smoke example, and an MLflow server, a Ray head (token auth) and `python -m api` whose
# /readyz must answer 200 with every check "ok". 3.5-9 minutes on 2 cores (mostly the
# install), so CI runs it after `make test` (.ci/run) rather than in it. Stops only the
# processes it started; removes everything it wrote. Needs the dev virtualenv (`make`).
#   scripts/install_smoke.sh     (PYTHON=python3 as in the Makefile; KEEP=1 keeps the folder;
#                                 INSTALL_SMOKE_WAIT_S=180: how long each service may take)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_PYTHON="$ROOT/.venv/bin/python"
WAIT_S="${INSTALL_SMOKE_WAIT_S:-180}"
[[ -x "$BUILD_PYTHON" ]] || { echo "no $BUILD_PYTHON: run make first" >&2; exit 1; }

# Only what this script sets reaches the installed code: no source tree on the path, no
# cluster, tracking server or settings inherited from the caller.
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME
while read -r name; do unset "$name"; done < <(compgen -e | grep -E '^(RAY_|SPARKORCH_|MLFLOW_)')

work="$(mktemp -d "${TMPDIR:-/tmp}/smoke-XXXXXX")"
logs="$work/logs"
mkdir -p "$logs"
pids=()
names=()
started=$SECONDS
phase_started=$SECONDS

phase() {  # name: prints how long the previous phase took, then the next one's name
    echo "   ($(( SECONDS - phase_started )) s)"
    phase_started=$SECONDS
    echo "== $1"
}

cleanup() {
    local rc=$?
    # Each service leads a session of its own (setsid), so its process group holds exactly
    # the processes it spawned (Ray's GCS, raylet and dashboard; MLflow's workers). Ray's
    # leader alone is asked first: `ray start --block` stops its cluster in order on SIGTERM
    # (~15 s here), which a SIGTERM to every one of its processes at once would not allow.
    local i pid
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        if [[ "${names[$i]}" == ray ]]; then kill -TERM "$pid"; else kill -TERM -- "-$pid"; fi \
            2>/dev/null || true
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        for _ in $(seq 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null && echo "   ${names[$i]}: killed what was left of it"
        echo "   ${names[$i]} stopped after $(( SECONDS - phase_started )) s"
    done
    wait 2>/dev/null || true  # reap them quietly (no "Killed" notices)
    if (( rc != 0 )); then
        for log in "$logs"/*.log; do
            [[ -f "$log" ]] && { echo "--- tail of $log"; tail -n 40 "$log"; }
        done
    fi
    if [[ -n "${KEEP:-}" ]]; then echo "kept $work"; else rm -rf "$work"; fi
    echo "   ($(( SECONDS - phase_started )) s)"
    echo "install smoke: $( (( rc == 0 )) && echo passed || echo FAILED) in $(( SECONDS - started )) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

quiet_pip() {  # command...: pip without one warning per configured index folder it lacks
    "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {  # name, command...: runs in its own session, logs to $logs/name.log
    local name=$1; shift
    setsid "$@" >"$logs/$name.log" 2>&1 < /dev/null &
    pids+=("$!")
    names+=("$name")
    echo "   $name: pid $!"
}

wait_http() {  # what, pid, url, accepted status regex
    local what=$1 pid=$2 url=$3 accept=$4 deadline=$(( SECONDS + WAIT_S )) code
    while (( SECONDS < deadline )); do
        kill -0 "$pid" 2>/dev/null || { echo "$what exited before answering $url" >&2; return 1; }
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url" || true)"
        [[ "$code" =~ $accept ]] && { echo "   $what answered $code after $(( SECONDS - phase_started )) s"; return 0; }
        sleep 1
    done
    echo "$what did not answer $url within $WAIT_S s (last status ${code:-none}):" >&2
    curl -s --max-time 5 "$url" >&2 || true
    return 1
}

echo "== build the wheel ($work)"
# From a copy of what git sees: a stale build/ or egg-info in the tree must not leak in.
src="$work/src"
mkdir -p "$src"
"$BUILD_PYTHON" - "$ROOT" "$src" <<'PY'
import shutil, subprocess, sys
from pathlib import Path

root, dest = Path(sys.argv[1]), Path(sys.argv[2])
listed = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=root, capture_output=True, check=True,
).stdout.decode()
for name in filter(None, listed.split("\0")):
    if (root / name).is_file():  # a tracked file deleted in the work tree is left out
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
PY
quiet_pip "$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" "$src"
wheel="$(ls "$work"/dist/*.whl)"
# Every file of the shipped packages must be in the wheel: setuptools ships the .py files
# of packages only, so a data file (a JSON catalog, a folder without __init__.py) would be
# silently missing. Alembic's authoring files are development-only: the service migrates
# itself without them (JobStore.migrate), and the /readyz phase below proves it.
"$BUILD_PYTHON" - "$wheel" "$src" <<'PY'
import sys, zipfile
from pathlib import Path

DEVELOPMENT_ONLY = {
    "orchestrator/control/migrations/alembic.ini",
    "orchestrator/control/migrations/script.py.mako",
}
wheel, src = sys.argv[1], Path(sys.argv[2])
shipped = set(zipfile.ZipFile(wheel).namelist())
wanted = {
    str(p.relative_to(src))
    for pkg in ("spark_core", "orchestrator", "jobs", "api")
    for p in (src / pkg).rglob("*")
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
}
missing = sorted(wanted - shipped - DEVELOPMENT_ONLY)
if missing:
    sys.exit("the wheel lacks files of the shipped packages:\n  " + "\n  ".join(missing))
print(f"   {Path(wheel).name}: {len(wanted)} package files, all shipped")
PY

phase "a fresh virtualenv ($PYTHON) with the wheel, no extras"
venv="$work/venv"
"$PYTHON" -m venv "$venv"
# As the Makefile does: the current pip reads the cache `make` filled (older pips do not).
quiet_pip "$venv/bin/python" -m pip install --quiet --upgrade pip
# --no-compile: byte-compiling all of torch, Ray and MLflow ahead would take minutes of CPU;
# what the smoke test imports is compiled as it goes.
quiet_pip "$venv/bin/python" -m pip install --quiet --no-compile "$wheel"
bin="$venv/bin"

phase "the CLI, run outside the repository"
run_dir="$work/run"
home="$work/home"
mkdir -p "$run_dir" "$home/data"
cd "$run_dir"
export SPARKORCH_HOME="$home" SPARKORCH_DATA_ROOTS="$home/data"
where="$("$bin/python" -c 'import orchestrator; print(orchestrator.__file__)')"
[[ "$where" == "$venv"/* ]] || { echo "orchestrator imported from $where, not the venv" >&2; exit 1; }
"$bin/sparkctl" --help >/dev/null
"$bin/sparkctl" validate "$ROOT/examples/pretrain-smoke.yaml"

phase "MLflow server and Ray head (token auth), from the venv"
mlflow_port="$(free_port)"
start mlflow "$bin/python" -m mlflow server --backend-store-uri "sqlite:///$work/mlflow.db" \
    --host 127.0.0.1 --port "$mlflow_port" --workers 1
token="$work/ray-token"
"$PYTHON" -c 'import secrets, sys; print(secrets.token_hex(32), end="")' > "$token"
chmod 600 "$token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token"
dashboard_port="$(free_port)"
# Every port of its own: Redis holds 6379 here and the test suite may run a Ray of its own.
start ray "$bin/ray" start --head --block --disable-usage-stats --num-cpus=1 \
    --temp-dir="$work/ray" --port="$(free_port)" --ray-client-server-port="$(free_port)" \
    --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --metrics-export-port="$(free_port)" --runtime-env-agent-port="$(free_port)"
ray_pid=${pids[-1]}
mlflow_pid=${pids[-2]}
# The dashboard answers 401 without the token once it is up.
wait_http "Ray dashboard" "$ray_pid" "http://127.0.0.1:$dashboard_port/api/version" '^[234]'
wait_http "MLflow" "$mlflow_pid" "http://127.0.0.1:$mlflow_port/health" '^200$'

phase "python -m api, /readyz"
api_port="$(free_port)"
SPARKORCH_API_PORT="$api_port" MLFLOW_TRACKING_URI="http://127.0.0.1:$mlflow_port" \
    SPARKORCH_RAY_DASHBOARD_URL="http://127.0.0.1:$dashboard_port" \
    start api "$bin/python" -m api
wait_http "the API" "${pids[-1]}" "http://127.0.0.1:$api_port/readyz" '^200$'
curl -s --max-time 30 "http://127.0.0.1:$api_port/readyz" | "$bin/python" -c '
import json, sys
body = json.load(sys.stdin)
print("   /readyz:", body)
bad = {name: state for name, state in body.get("checks", {}).items() if state != "ok"}
missing = {"database", "ray", "mlflow"} - set(body.get("checks", {}))
if body.get("status") != "ok" or bad or missing:
    sys.exit(f"not ready: {bad or body}, missing checks {sorted(missing)}")
'
phase "stop the services, remove $work"
