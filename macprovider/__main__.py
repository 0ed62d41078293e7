"""`python -m macprovider` runs the CLI."""

from macprovider.cli import main

if __name__ == "__main__":
    main()
