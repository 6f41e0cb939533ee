# One image for the three services, the client and the PKI job. No key or certificate is baked in: the
# PKI lives in a volume that the pki job fills at run time (see docker-compose.yml).
#
# PYTHON_IMAGE: any image with Python 3.11+ and venv. Without a registry, `make base-image` builds one.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Behind a TLS-inspecting proxy, pip needs the proxy's CA. `make image EXTRA_CA_CERTS=/path/bundle.pem`
# copies that file into docker/extra-ca/ (ignored by git); it is used for this stage only and never
# reaches the final image.
COPY docker/extra-ca/ /tmp/extra-ca/
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY pki /src/pki
COPY shared /src/shared
COPY services /src/services
COPY client /src/client
COPY cockpit /src/cockpit
COPY view /src/view
RUN set -eu; \
    cp /etc/ssl/certs/ca-certificates.crt /tmp/bundle.pem; \
    for extra in /tmp/extra-ca/*.pem /tmp/extra-ca/*.crt; do \
        if [ -f "$extra" ]; then cat "$extra" >> /tmp/bundle.pem; fi; \
    done; \
    PIP_CERT=/tmp/bundle.pem /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check /src

FROM ${PYTHON_IMAGE}
# A fixed, unprivileged uid and gid: the pki job hands the service keys to it (mode 0600). Compose and
# Kubernetes give each identity a uid of its own (`user:`, `runAsUser`), overriding this default.
RUN groupadd --system --gid 10001 mesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent mesh \
    && mkdir /pki && chown 10001:10001 /pki
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MESH_PKI_DIR=/pki \
    MESH_HOST=0.0.0.0
# Numeric, not a name: Kubernetes' runAsNonRoot can only check a numeric USER (a name would have to be looked
# up inside the image), and a scanner can see without running anything that it is not root.
USER 10001:10001
EXPOSE 8443
CMD ["python", "-m", "services"]
