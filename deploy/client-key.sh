#!/usr/bin/env bash
# Prints the first client API key of deploy/.env's PROXY_API_KEYS (name:key[:rate[:burst]],
# comma-separated), or nothing. `just chat`, `stress` and `warmup` send it when
# PROXY_API_KEY is not set.
set -euo pipefail
env_file="$(dirname "$0")/.env"
[ -f "$env_file" ] || exit 0
keys="$(sed -n 's/^PROXY_API_KEYS=//p' "$env_file" | tail -n 1)"
first="${keys%%,*}"
[ -n "$first" ] || exit 0
key="${first#*:}"
echo "${key%%:*}"
