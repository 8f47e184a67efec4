"""The engine: scheduler, KV cache, sampler, speculative drafts, the step loop and its async
wrapper."""
