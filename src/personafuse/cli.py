"""The ``personafuse`` command line. Sub-command groups live beside the code they drive."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="personafuse",
    help="PersonaFuse: situation-aware personality experts for language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _register() -> None:
    from personafuse.chat_cli import register as register_chat

    register_chat(app)
    from personafuse.evaluation.cli import register as register_eval

    register_eval(app)


def main() -> None:
    _register()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
