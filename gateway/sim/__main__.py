"""`python -m gateway.sim --port 9101 --region us-east`: one simulated provider."""

from __future__ import annotations

import argparse
import sys

from gateway.sim.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sim", description="Simulated OpenAI-compatible provider"
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
