# The imageserve node image: Ray's CUDA image for ray 2.60 / Python 3.11, with imageserve and every
# package it needs at the versions and sha256 hashes of lock/image.txt (`make lock` writes it), the
# CUDA 12.8 torch among them. `make image` builds it; docs/deploy.md says how to push it and point the
# cluster configs at it (`imageserve cluster-configs --image ...`).
#
# 4-bit (nunchaku) variants need the real nunchaku wheel for this image's Python, torch and CUDA, from
# https://github.com/nunchaku-tech/nunchaku/releases: its URL as NUNCHAKU_WHEEL and its sha256 as
# NUNCHAKU_WHEEL_SHA256 (the build refuses a wheel without one). Never `pip install nunchaku`: the PyPI
# package of that name is an unrelated library.
#
#   docker build -t imageserve:0.1.0 .
#   docker build -t imageserve:0.1.0-nunchaku \
#       --build-arg NUNCHAKU_WHEEL=https://github.com/nunchaku-tech/nunchaku/releases/download/<tag>/<wheel> \
#       --build-arg NUNCHAKU_WHEEL_SHA256=<sha256 of that wheel> .
#
# The base image is named by tag: its digest could not be read from where this file was written, and none is
# made up here. Pin it for your builds: `docker buildx imagetools inspect rayproject/ray:2.60.0-py311-cu128`
# prints the digest; build with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128@sha256:<that digest>
# (docs/security.md, "Supply chain").

ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ARG NUNCHAKU_WHEEL=""
ARG NUNCHAKU_WHEEL_SHA256=""

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

# Every dependency, pinned and hash-checked (pip refuses any file whose sha256 is not in the lock), in a
# layer of its own that a code change does not rebuild.
COPY --chown=ray:users lock/image.txt ./lock/image.txt
RUN pip install --no-cache-dir --require-hashes -r lock/image.txt

# imageserve itself, and nunchaku, without dependencies: the lock already holds all of them. imageserve is built
# with the lock's setuptools and wheel (--no-build-isolation), from no index at all: with build isolation pip
# would fetch its build tools from PyPI, unpinned and unhashed.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users cluster ./cluster
RUN pip install --no-cache-dir --no-index --no-deps --no-build-isolation . \
    && if [ -n "${NUNCHAKU_WHEEL}" ]; then \
         if [ -z "${NUNCHAKU_WHEEL_SHA256}" ]; then echo "NUNCHAKU_WHEEL needs NUNCHAKU_WHEEL_SHA256" >&2; exit 1; fi; \
         echo "${NUNCHAKU_WHEEL} --hash=sha256:${NUNCHAKU_WHEEL_SHA256}" > /tmp/nunchaku.txt; \
         pip install --no-cache-dir --no-deps --require-hashes -r /tmp/nunchaku.txt; \
       fi \
    && python -c "import serve_app, deployments, cluster; print('imageserve', serve_app.__version__)"

# The checks an operator runs on a node: `docker run --gpus all IMAGE imageserve doctor`.
CMD ["imageserve", "doctor"]
