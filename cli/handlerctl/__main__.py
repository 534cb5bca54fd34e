"""`python -m handlerctl`: the same as the `handlerctl` command."""

from handlerctl.commands import main

if __name__ == "__main__":
    main()
