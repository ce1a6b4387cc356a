"""Run every benchmark module (`python -m benchmarks [--quick] [module options]`) and print their tables."""
import importlib
import sys

from benchmarks import MODULES


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in MODULES:
        print(f"== benchmarks.{name}")
        importlib.import_module(f"benchmarks.{name}").main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
