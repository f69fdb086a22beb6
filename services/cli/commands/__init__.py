"""One module per sub-command group; each defines `register(subparsers)` and sets `func` on its parsers."""
