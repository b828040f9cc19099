"""`python -m maskformer_cli ...` and `torchrun -m maskformer_cli train ...` enter here."""

from maskformer_cli.cli import main

if __name__ == "__main__":
    main()
