"""`python -m slimkit ...` (and `torchrun ... -m slimkit ...`): the command line."""

from slimkit.cli.main import main

if __name__ == "__main__":
    main()
