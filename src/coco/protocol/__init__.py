"""The KBS attestation protocol (RCAR, version 0.4.0): messages and the client, shared by both sides."""
