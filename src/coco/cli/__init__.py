"""The ``coco`` command line: one group per part, ``coco <group> <verb>``."""
