"""AMD SEV-SNP: the attestation report layout, AMD's key hierarchy and the verifier."""
