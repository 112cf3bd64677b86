"""The ``personafuse`` command line. Sub-command groups live beside the code they drive."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="personafuse",
    help="PersonaFuse: situation-aware personality experts for language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    # docstrings are wrapped at 100 columns: join their lines into paragraphs, as Markdown does
    rich_markup_mode="markdown",
)


def _register() -> None:
    from personafuse.data.cli import app as data_app

    app.add_typer(data_app, name="data")
    from personafuse.chat_cli import register as register_chat
    from personafuse.training.cli import app as train_app

    register_chat(app)
    app.add_typer(train_app, name="train")
    from personafuse.evaluation.cli import register as register_eval

    register_eval(app)
    from personafuse.serving.cli import register as register_serving

    register_serving(app)
    from personafuse.reproduce.cli import register as register_reproduce

    register_reproduce(app)


def main() -> None:
    _register()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
