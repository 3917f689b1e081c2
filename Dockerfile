# The llm-telemetry operator image: `llm-telemetry-operator` (kopf) on a slim Python, as a numeric non-root user.
#
#   docker build -t llm-telemetry-operator:0.2.0 .
#
# The chart's image.repository/tag default to exactly that name and the package version (see docs/install.md).

ARG PYTHON_VERSION=3.12

# Build stage: install the package with its operator extra into a virtualenv, so the final stage copies one
# directory and carries no pip cache, compilers or source tree.
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY middleware/ middleware/
COPY operator/ operator/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install '.[operator]'

FROM python:${PYTHON_VERSION}-slim
LABEL org.opencontainers.image.title="llm-telemetry-operator" \
      org.opencontainers.image.description="Kubernetes operator wiring LLM services' metrics, alerts, dashboards, traces and logs" \
      org.opencontainers.image.licenses="Apache-2.0"
# A numeric uid/gid: the kubelet can only enforce runAsNonRoot when USER is numeric. The chart's
# podSecurityContext.runAsUser uses the same number.
RUN groupadd --system --gid 10001 llmt \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin llmt
COPY --from=build /opt/venv /opt/venv
# pip compiled the bytecode at install time; the root filesystem is read-only at run time, so never write more.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# 9465: the operator's Prometheus metrics; 8080: kopf's /healthz.
EXPOSE 9465 8080
ENTRYPOINT ["llm-telemetry-operator"]
