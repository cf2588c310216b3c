from deployfs.cli.serve import main

main()
