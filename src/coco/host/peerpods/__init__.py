"""Peer pods: the cloud-api-adaptor (caa), its providers, the agent proxy, the webhook and the cleanup controller."""
