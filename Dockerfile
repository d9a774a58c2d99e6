# fedgate's one image: agent, gateway, controller, sidecar and its capture init container.
# Build: docker build -t fedgate:0.1.0 .   (fedgate kind up does it; docs/kubernetes.md)

# --- build: a wheel of fedgate and of every dependency -----------------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
# The wheels need no compiler on the slim image (all have manylinux wheels); pip only.
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY ca ./ca
COPY federation ./federation
COPY gateway ./gateway
COPY sidecar ./sidecar
COPY clusters ./clusters
COPY fedgate ./fedgate
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- run -----------------------------------------------------------------------------------------
FROM python:3.11-slim AS run
# iptables for the sidecar injector's init container (it installs the capture rules), git for
# the controllers' GitOps clone (--config-repo); nothing else from apt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels fedgate && rm -rf /wheels
# The MCS CRDs `fedgate manifests` reads, at the path it looks for them (--deploy-dir).
COPY deploy /usr/local/share/fedgate/deploy
# UID/GID 1337: the sidecar's, whose own traffic the capture rules let through.
RUN groupadd --gid 1337 fedgate && useradd --uid 1337 --gid 1337 --no-create-home \
    --shell /usr/sbin/nologin fedgate
USER 1337:1337
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
ENTRYPOINT ["fedgate"]
CMD ["--help"]
