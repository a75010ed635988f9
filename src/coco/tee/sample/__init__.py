"""The no-hardware TEE: evidence with no signature. INSECURE, for tests and demos only."""
