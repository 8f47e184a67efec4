"""Environment for every Ray node we run: ``exaone-cluster serve``'s local cluster
(cluster.commands.local) and the Helm chart's pods (helm/exaone-cluster, the Ray containers'
env; tests/unit/helm checks that it lists all of these). Each one cuts work Ray or Serve does
for nothing while a model is served; on a small machine that work is taken from the engine."""

RAY_ENV = {
    # No usage reports to Ray's own servers (a call out of the cluster, every so often).
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray starts its workers at niceness 15 (they yield to anything else on the machine): the
    # engine replicas then lose their core to the clients and Ray's own processes. Measured on
    # 2 cores, bundled model, one stream: TPOT 7.8 ms served at 15 against 4.6 in-process.
    "RAY_worker_niceness": "0",
    # Serve's controller reconciles every 0.1 s by default, asking GCS for every node's
    # resources each time: 8% of a core between them with the cluster idle, taken from the
    # engine on a small machine. Every 0.5 s: 3% (bench/served_cpu.py --idle-s). Replicas then
    # start, stop and scale up to 0.4 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Every Ray worker process costs 0.6-0.7% of a core doing nothing (its task loop wakes
    # every 10 ms to check for signals): Ray's default prestarts one for the first driver that
    # nothing here uses, and it stayed idle for the server's life.
    "RAY_prestart_worker_first_driver": "0",
    # Ray's log monitor lists the log directory 10 times a second while it holds fewer than
    # this many files (0.8% of a core, idle); then every LOG_NAME_UPDATE_INTERVAL_S.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    # Serve hands its own request metrics to Ray's metrics agent every 0.1 s from every replica
    # and handle; the agent exports every 10 s (Ray's metrics_report_interval_ms), so once a
    # second loses nothing a scrape sees.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # A replica that failed its health checks is stopped at once rather than drained (Serve's
    # default waits its graceful_shutdown_timeout_s for its ongoing calls). Ours fail a check
    # when they cannot serve: an attention replica's hung step has already ended its requests
    # (cluster.deployments.attention), and a frozen process (a Router, an attention replica)
    # finishes nothing; the wait only kept it, and the port it holds, from being replaced.
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}
