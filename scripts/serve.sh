#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then serve the default base (SmolLM2-135M-Instruct,
# converted on first use) with the packs in ./packs on http://127.0.0.1:8000.
# Extra arguments go to `skillpack serve` (e.g. --port 9000, --base DIR, --api-key KEY).
# Without SKILLPACK_ADMIN_TOKEN an admin token is generated and printed once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${SKILLPACK_ADMIN_TOKEN:-}" ]; then
  SKILLPACK_ADMIN_TOKEN="$(python -c 'import secrets; print(secrets.token_urlsafe(24))')"
  export SKILLPACK_ADMIN_TOKEN
  echo "admin token for /admin routes (Authorization: Bearer ...): ${SKILLPACK_ADMIN_TOKEN}"
fi
mkdir -p packs
exec skillpack serve "$@"
