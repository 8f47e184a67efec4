"""An attention replica's prefix cache from the ClusterConfig: the engine's settings, the Redis
tier (authenticated values) and the pinned system prompts as token ids."""

from __future__ import annotations

import functools
import os

from cluster.config import ClusterConfig
from router.tokenizer import Tokenizer


def prefix_cache_parts(config: ClusterConfig):
    """-> (PrefixCacheConfig | None, a factory of the RedisTier or None, pinned prefixes as
    token ids)."""
    from replicas.prefix_cache.fingerprint import model_fingerprint
    from replicas.prefix_cache.manager import PrefixCacheConfig
    from replicas.prefix_cache.redis_tier import MAC_KEY_ENV, REDIS_PASSWORD_ENV, RedisTier
    from router.requests import system_prefix_ids

    pc = config.prefix_cache
    if not pc.enabled:
        return None, None, []
    fp = model_fingerprint(config.model_path, config.dtype, pc.revision)
    if config.engine.num_speculative_tokens:
        fp += "-mtp"  # its snapshots also hold the MTP layer's rows: a layout of their own
    prefix = PrefixCacheConfig(
        fp, pc.snapshot_interval_tokens, pc.local_snapshot_bytes, pc.redis_queue_bytes
    )
    redis = None
    if pc.redis_url:
        mac_key = os.environ.get(MAC_KEY_ENV)
        if not mac_key:
            raise ValueError(
                f"prefix_cache.redis_url is set but {MAC_KEY_ENV} is not: values in "
                "Redis are authenticated with a secret every attention replica "
                "shares; set it in their environment (the Helm chart does, from a "
                "Secret; exaone-cluster serve generates one)"
            )
        redis = functools.partial(  # made where the engine runs (its own process, maybe)
            RedisTier,
            pc.redis_url,
            f"exaone:{fp}",
            mac_key=mac_key,
            ttl_s=pc.ttl_s,
            password=pc.redis_password or os.environ.get(REDIS_PASSWORD_ENV),
            ssl_ca_certs=pc.redis_tls_ca_file,
            timeout_s=pc.redis_timeout_s,
        )
    pinned = []
    if pc.pinned_system_prompts:
        tokenizer = Tokenizer(config.model_path)
        for text in pc.pinned_system_prompts:
            # As the router renders a chat that starts with this system message.
            chat = [{"role": "system", "content": text}, {"role": "user", "content": ""}]
            ids = system_prefix_ids(tokenizer, chat)
            if ids is None:
                raise ValueError(
                    "prefix_cache.pinned_system_prompts: the chat template cannot "
                    "render a system message alone"
                )
            pinned.append(ids)
    return prefix, redis, pinned
