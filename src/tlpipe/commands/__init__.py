"""`tlpipe <command>` implementations: each module has `main(argv)`, dispatched by tlpipe.cli.main."""
