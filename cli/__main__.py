"""``python -m neuro_ood.cli``: the ``neuro-ood`` command, e.g. for ``torchrun -m neuro_ood.cli train ...``."""

from neuro_ood.cli.main import app

if __name__ == "__main__":
    app(prog_name="neuro-ood")
