"""``python -m kdfused``: the version and the build, as a bug report wants them."""

from __future__ import annotations

import argparse
import json

from ._info import __version__, build_info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m kdfused", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"kdfused {__version__}")
    p.parse_args(argv)
    print(json.dumps(build_info(), indent=1))


if __name__ == "__main__":
    main()
