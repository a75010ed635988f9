"""The Key Broker Service: RCAR sessions, resources, policies, admin API over HTTP."""
