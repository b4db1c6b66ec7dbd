from fluxshard.cli import main

main()
