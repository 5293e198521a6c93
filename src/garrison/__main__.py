from garrison.cli.main import main

main()
