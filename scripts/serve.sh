#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then serve the default base (SmolLM2-135M-Instruct,
# converted on first use) on http://127.0.0.1:8000 with the demo packs in ./packs, served
# read-only: uploads go to the pack store (~/.local/share/skillpack/packs unless --packs).
# Extra arguments go to `skillpack serve` (e.g. --port 9000, --base DIR, --api-key KEY).
# The admin token is SKILLPACK_ADMIN_TOKEN if set; otherwise one is generated once, kept in
# ~/.config/skillpack/admin_token (mode 0600) and printed when the server is ready.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec skillpack serve --readonly-packs "$PWD/packs" "$@"
