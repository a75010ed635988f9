"""`make demo`: runs `coco demo` (src/coco/demo), the life of a confidential pod on this machine."""

import sys

from coco.cli.main import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
