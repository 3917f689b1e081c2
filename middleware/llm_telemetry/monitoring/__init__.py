"""What Prometheus and Grafana need to read the middleware's metrics: alert and recording rules, a dashboard.

Generators only, never imported on the request path: :mod:`.rules` builds Prometheus rule files and
PrometheusRule objects, :mod:`.dashboards` the Grafana dashboard. Both read the metric contract in
:mod:`llm_telemetry.instruments`.
"""
