"""Integrity: dm-verity trees (:mod:`.verity`), the tarfs index (:mod:`.tarindex`), tardev layer
files (:mod:`.tardev`) and initdata documents (:mod:`.initdata`)."""
