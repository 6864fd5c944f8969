# The imageserve node image: Ray's CUDA image for ray 2.60 / Python 3.11, with imageserve, its pinned
# dependencies and the CUDA torch that matches the base. `make image` builds it; docs/deploy.md says
# how to push it and point the cluster configs at it (`imageserve cluster-configs --image ...`).
#
# 4-bit (nunchaku) variants need the real nunchaku wheel for this image's Python, torch and CUDA, from
# https://github.com/nunchaku-tech/nunchaku/releases, passed as NUNCHAKU_WHEEL (a URL or a path in the
# build context). Never `pip install nunchaku`: the PyPI package of that name is an unrelated library.
#
#   docker build -t imageserve:0.1.0 .
#   docker build -t imageserve:0.1.0-nunchaku \
#       --build-arg NUNCHAKU_WHEEL=https://github.com/nunchaku-tech/nunchaku/releases/download/<tag>/<wheel> .

ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The CUDA 12.8 build of torch, for the base image's CUDA; pyproject.toml bounds the version.
ARG TORCH_SPEC="torch==2.9.*"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG NUNCHAKU_WHEEL=""

# Ray's image already runs as the non-root user `ray` (uid 1000); everything below is installed as it.
USER ray
WORKDIR /home/ray/imageserve

# Weights live on a volume, not in the image: mount it on every node (`imageserve download` fills it)
# and serve offline.
ENV HF_HOME=/home/ray/hf-cache \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
RUN mkdir -p /home/ray/hf-cache
VOLUME /home/ray/hf-cache

# torch first, from the CUDA index, so that installing imageserve keeps it rather than pulling another.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users cluster ./cluster
RUN pip install --no-cache-dir . \
    && if [ -n "${NUNCHAKU_WHEEL}" ]; then pip install --no-cache-dir "${NUNCHAKU_WHEEL}"; fi \
    && python -c "import serve_app, deployments, cluster; print('imageserve', serve_app.__version__)"

# The checks an operator runs on a node: `docker run --gpus all IMAGE imageserve doctor`.
CMD ["imageserve", "doctor"]
