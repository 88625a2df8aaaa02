from kprune_cli.cli.main import main

main()
