"""``bnncc targets [--prepare]``: the targets, what each needs on this host, and what is missing."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from bnncc.cli._app import app, console


@app.command("targets")
def targets_command(
    prepare: bool = typer.Option(False, "--prepare", help="download the aarch64 TVM runtime and build the "
                                 "aarch64 runners now (pip, aarch64-linux-gnu-g++), so later runs and bundles need "
                                 "no network and no cross compiler"),
) -> None:
    """List the compile targets and check their host requirements."""
    from bnncc.targets import registry

    if prepare:
        from bnncc.targets.vmrunner import AARCH64, ensure_runner

        console.print(f"aarch64 runner: {ensure_runner(AARCH64)}", soft_wrap=True)
        # the bundle's, which finds the runtime in its own folder: `bnncc bundle` then needs no compiler
        console.print(f"aarch64 bundle runner: {ensure_runner(AARCH64, beside_runtime=True)}", soft_wrap=True)
    table = Table(title="bnncc targets")
    for column in ("target", "needs", "for", "found", "to install"):
        # folded, not cut: in an 80-column terminal the paths and install commands ended in "…"
        table.add_column(column, overflow="fold")
    # probed once: the table and the missing line describe the same look at the host
    checked = registry.check()
    for name, requirements in checked.items():
        for i, req in enumerate(requirements):
            found = Text(str(req.found), style="green") if req.found else Text("missing", style="red")
            table.add_row(name if i == 0 else "", req.what, req.needed_for, found, "" if req.found else req.install)
        table.add_section()
    console.print(table)
    missing = [f"{name}: {req.what}" for name, reqs in checked.items() for req in reqs if not req.found]
    console.print("missing: " + ("; ".join(missing) if missing else "nothing"), soft_wrap=True)  # one line in a pipe
