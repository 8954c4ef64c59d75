"""care-q recipes: list the recipes shipped with care-q (care_q/recipes/*.yaml) and what they set."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from care_q.quant.recipe import list_recipes, load_recipe


def add_parser(sub):
    p = sub.add_parser("recipes", help="list quantization recipes", description=__doc__)
    p.add_argument("--show", help="print one recipe's resolved settings (a name or a YAML path)")
    return p


def run(args) -> int:
    c = Console()
    if not c.is_terminal:
        c = Console(width=150)  # piped or captured: one row a recipe, not an 80-column wrap
    if args.show:
        c.print_json(json.dumps(load_recipe(args.show).to_json()))
        return 0
    t = Table("recipe", "kind", "targets", "io", "gelu", "description")
    for p in list_recipes():
        r = load_recipe(p)
        t.add_row(r.name, r.kind, ",".join(r.targets), r.io, r.gelu, r.description)
    c.print(t)
    return 0
