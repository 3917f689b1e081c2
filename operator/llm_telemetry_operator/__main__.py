"""Entry point of ``llm-telemetry-operator``: run kopf with settings from the environment."""

from __future__ import annotations

import sys

import kopf

from llm_telemetry_operator.config import OperatorConfig
from llm_telemetry_operator.errors import ConfigurationError


def main() -> int:
    """Run the operator until it is signalled to stop; exit 2 on bad configuration."""
    try:
        config = OperatorConfig.from_env()
    except ConfigurationError as exc:
        print(f"llm-telemetry-operator: configuration error: {exc}", file=sys.stderr)
        return 2
    kopf.configure(log_format=kopf.LogFormat.JSON, log_refkey="object")
    from llm_telemetry_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        # Peering on: a standby replica waits while another one holds the peering object.
        standalone=False,
        peering_name=config.peering,
        priority=config.priority,
        clusterwide=config.clusterwide,
        namespaces=list(config.namespaces),
        liveness_endpoint=config.health or None,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
