"""What runs inside the TEE: the KBS client (kbc), the Attestation Agent (aa), the Confidential
Data Hub (cdh) and their servers. Never imports ``coco.trustee`` or ``coco.host``: the guest
talks to them only on the wire."""
