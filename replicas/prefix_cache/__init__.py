"""The prefix cache: shared KV blocks in a replica, and Redis as the tier all replicas share."""
