"""The `exaone-cluster` command line: serve, status, generate / chat, and the local Ray, Redis and
loopback set-up they use."""
