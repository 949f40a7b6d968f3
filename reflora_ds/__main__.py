"""``python -m reflora_ds``: the command line, also for ``deepspeed --module reflora_ds``."""

from .cli import main

main()
