"""``bnncc bundle LIBDIR -o OUTDIR``: a CPU library folder -> a folder that runs it with no Python."""

from __future__ import annotations

from pathlib import Path

import typer

from bnncc.cli._app import app, console


@app.command("bundle")
def bundle_command(
    library: Path = typer.Argument(..., help="folder written by `bnncc compile` (x86-64 or arm64)"),
    output: Path = typer.Option(..., "--output", "-o", help="bundle folder to write (new, empty or an earlier bundle)"),
) -> None:
    """Put the library beside TVM's runtime and a runner, to copy to the machine that runs it."""
    from bnncc.targets.bundle import bundle

    folder = bundle(library, output)
    console.print(f"{library} -> {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}; "
                  f"see {folder / 'README.txt'}", highlight=False, soft_wrap=True)
