from lorafit.cli.main import main

main()
