"""Trustee, the owner's side: the Key Broker Service, the Attestation Service and the RVPS."""
