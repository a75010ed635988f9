"""Cryptographic helpers shared by every floor: digests and hashing (JOSE and JCS come later)."""
