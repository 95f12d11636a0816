"""`python -m dimr_lab ...` = the `dimr-lab` command."""

from dimr_lab.cli import main

if __name__ == "__main__":
    main()
