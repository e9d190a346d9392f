"""Operations: Prometheus metrics, OpenTelemetry tracing and the fault-injection failpoints."""
