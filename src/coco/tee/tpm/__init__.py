"""TPM 2.0: quote structures, the generic TPM verifier and an attester driving tpm2-tools."""
