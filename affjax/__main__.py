from affjax.cli import run

run()
