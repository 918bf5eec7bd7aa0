"""`python -m pefops.info`: the same report as `python -m pefops`."""

from pefops.__main__ import main

if __name__ == "__main__":
    main()
