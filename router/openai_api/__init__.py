"""OpenAI-compatible HTTP API, as a translation onto the Generation service (router.service):
request bodies become exaone.v1 GenerateRequests (``requests``), the service's streams become
OpenAI's objects and chunks (``responses``, ``frontend``). No HTTP library, no torch, no Ray:
cluster.deployments.http_ingress serves it."""
