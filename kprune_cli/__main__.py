from kprune_cli.cli import main

main()
