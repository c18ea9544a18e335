"""`fab` tasks in this checkout: the same tasks as the `cronium-fab` program.

``fab -H web1,web2 run-event --id 7`` runs the event ONCE across both hosts, in parallel, because
``fabric.yaml`` beside this package sets ``tasks.executor_class`` to cronium-fab's executor
(outside this checkout, use the ``cronium-fab`` program, which needs no fabfile).
"""

from cronium_fab.cli import build_namespace

ns = build_namespace()
