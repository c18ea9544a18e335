"""`fab` tasks in this checkout: the same tasks as the `cronium-fab` program.

``fab -H web1,web2 run-event --id 7`` runs the event ONCE across both hosts, in parallel, because
this collection is loaded with cronium-fab's executor (see ``fabfile/fabric.py`` note in README:
use ``cronium-fab`` when you need the group behaviour outside this checkout).
"""

from cronium_fab.cli import build_namespace

ns = build_namespace()
