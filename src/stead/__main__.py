from stead.cli.main import main

main()
