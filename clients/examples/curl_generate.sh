#!/usr/bin/env bash
# The HTTP API with curl (and jq): an OpenAI-style generation, then a job followed over SSE.
#   ACCEL_DIFFUSION_URL=http://127.0.0.1:8000 bash clients/examples/curl_generate.sh OUT_DIR
set -euo pipefail
URL="${ACCEL_DIFFUSION_URL:-http://127.0.0.1:8000}"
OUT="${1:-outputs}"
mkdir -p "$OUT"
MODEL=$(curl -sf "$URL/v1/models" | jq -r '.data[0].id')

# synchronous, OpenAI-compatible: images come back base64-encoded
curl -sf "$URL/v1/images/generations" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"a purple square on an orange background\", \"seed\": 5,
       \"num_inference_steps\": 4}" | jq -r '.data[0].b64_json' | base64 -d > "$OUT/square.png"
echo "wrote $OUT/square.png"

# asynchronous: a job, its server-sent events until it ends, then its result
JOB=$(curl -sf "$URL/v1/jobs" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"a white cross on a green background\", \"seed\": 1, \"steps\": 4}" | jq -r .id)
curl -sfN "$URL/v1/jobs/$JOB/events" | grep '^event:'
curl -sf "$URL/v1/jobs/$JOB" | jq -r '.result.images[0].b64_json' | base64 -d > "$OUT/cross.png"
echo "wrote $OUT/cross.png"
