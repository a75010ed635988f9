"""``coco demo`` / ``make demo``: the life of a confidential pod on this machine, with real parts.

:mod:`.run` is the script (steps 1 to 7 of issue 16), :mod:`.owner` the KBS, registry and
containerd, :mod:`.workload` the image and what the KBS keeps, :mod:`.pod` the pod, its policy,
its initdata and the refusals, :mod:`.session` the steps, commands, processes and summary.
"""
