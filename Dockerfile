# SkillPack Server on CPU: the default base (SmolLM2-135M-Instruct) converted at build time,
# served with the demo packs from packs/ (read-only, at /app/packs); uploads go to the volume at /data.
#   docker build -t skillpack .
#   docker run -p 8000:8000 -e SKILLPACK_ADMIN_TOKEN=change-me-please -v skillpack-data:/data skillpack
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    SKILLPACK_CACHE=/app/.cache SKILLPACK_PACKS=/data/packs SKILLPACK_READONLY_PACKS=/app/packs
WORKDIR /app

# a C compiler: the CPU path builds its compact pack kernels on first start (docs/CPU_PATH.md);
# without one it keeps float32 factors, 4-7x the memory per resident pack
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# pinned CPU wheel first: an unpinned torch requirement would pull a multi-GB CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# then exactly the locked versions (scripts/lock.sh writes the lock), so an upstream release
# cannot change the image
COPY requirements-serve.lock ./
RUN pip install --no-deps --require-hashes -r requirements-serve.lock

COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY skillpacks ./skillpacks
COPY evals ./evals
COPY server ./server
COPY packs ./packs
RUN pip install --no-deps --no-build-isolation . \
 && python -m skillpacks.default_base \
 && useradd --create-home skillpack && mkdir -p /data/packs && chown -R skillpack /app/.cache /data
USER skillpack

EXPOSE 8000
VOLUME ["/data"]
CMD ["skillpack", "serve", "--host", "0.0.0.0", "--port", "8000"]
