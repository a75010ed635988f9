"""Cloud providers of the CAA, one package each (see coco.host.peerpods.provider)."""
