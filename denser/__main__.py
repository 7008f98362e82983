from denser.cli import run

run()
