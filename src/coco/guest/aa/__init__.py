"""The Attestation Agent (AA): evidence of this TEE, KBS tokens, runtime measurements, init-data.

:mod:`~coco.guest.aa.config` reads upstream's aa.toml; :mod:`~coco.guest.aa.eventlog` keeps the
runtime-measurement log (AAEL); :mod:`~coco.guest.aa.service` is the agent and its ttRPC service.
"""
