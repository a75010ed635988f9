"""Intel TDX: the DCAP quote layout, the PCK chain to Intel's root and the verifier."""
