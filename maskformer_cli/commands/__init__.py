"""The entry points: one module per `maskformer` command (train, evaluate, predict, ablate, info,
prepare_data). cli.py parses the command line and calls them; they call the core and the plumbing, never
each other or the CLI."""
