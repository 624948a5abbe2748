"""`python -m flowtrain` (and `torchrun -m flowtrain`) run the same CLI as the `flowtrain` command."""

from flowtrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
