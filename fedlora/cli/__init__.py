"""The `fedlora` command line."""
