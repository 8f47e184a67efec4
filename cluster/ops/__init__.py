"""Operations: autoscaling and expert-balancing policies, live rebalancing, capacity, metrics and
the Grafana dashboard."""
